"""What several ``nbce-rag`` subcommands share: the question argument (positional, ``-q`` as an
alias), the decoding options (one definition for ``generate``, ``ask`` and ``chat``), their
validation through :class:`~nbce_rag.config.NBCEConfig` *before* any model loads, the help
formatter that keeps the examples of an epilog as written, and argparse value types.

Nothing heavy is imported at module level: ``nbce-rag --help`` must stay instant.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that a paragraph with indented lines (the examples of an
    epilog) is printed as written instead of being re-wrapped into one line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if any(line.startswith("  ") for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)


def examples(*lines: str) -> str:
    """An epilog: ``examples:`` then one indented command line each (``# ...`` comments allowed)."""
    return "examples:\n" + "\n".join("  " + line for line in lines)


# ------------------------------------------------------------------ argparse value types


def _int_at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
    return v


def positive_int(text: str) -> int:
    """An ``int`` >= 1 (argparse type)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An ``int`` >= 0 (argparse type)."""
    return _int_at_least(text, 0)


# ------------------------------------------------------------------ the question


def add_question(p: argparse.ArgumentParser, *, required: bool, what: str = "question", help: Optional[str] = None) -> None:
    """The question as positional words (joined with spaces), with ``-q/--question`` (or
    ``--query``) as an alias for scripts. Read it back with :func:`question_of`."""
    p.add_argument(what, nargs="*", default=[], metavar=what.upper(),
                   help=help or f"the {what} (several words are joined with spaces)")
    p.add_argument("-q", f"--{what}", dest=f"{what}_opt", default=None, metavar="TEXT",
                   help=f"the {what}, as an option (same as the positional {what.upper()})")
    p.set_defaults(_question_dest=what, _question_required=required)


def question_of(args: argparse.Namespace) -> Optional[str]:
    """The question given positionally or with ``-q``; ``None`` when neither was given and the
    command allows that (``ask`` then reads questions from stdin). An empty question is an
    error (:class:`~nbce_rag.errors.ConfigError`)."""
    from nbce_rag.errors import ConfigError

    what = args._question_dest
    words, opt = getattr(args, what), getattr(args, f"{what}_opt")
    if words and opt is not None:
        raise ConfigError(f"give the {what} once: either as positional words or with -q/--{what}")
    if opt is None and not words:
        if args._question_required:
            raise ConfigError(f"give a {what}: nbce-rag {args.command} \"your {what}\" (or -q \"...\")")
        return None
    text = opt if opt is not None else " ".join(words)
    if not text.strip():
        raise ConfigError(f"the {what} is empty; give the text to answer, e.g. nbce-rag {args.command} \"What is NBCE?\"")
    from nbce_rag.types import check_text

    return check_text(text, f"the {what}")


# ------------------------------------------------------------------ decoding options

#: name of the NBCEConfig field that each option of :func:`add_decoding_options` sets
_DECODING_DESTS = ("max_new_tokens", "pooling", "beta", "stop", "temperature", "top_p", "top_k", "seed",
                   "min_p", "repetition_penalty", "no_repeat_ngram_size", "frequency_penalty", "presence_penalty",
                   "suppress_tokens")


def add_decoding_options(p: argparse.ArgumentParser, *, max_new_tokens: Optional[int] = None) -> None:
    """The NBCE decoding options, one definition for every command that decodes. Values are
    checked by :func:`decoding_options` (through ``NBCEConfig.validate``) before models load."""
    g = p.add_argument_group("decoding (NBCEConfig; checked before any model loads)")
    default = "the decoder's, 64" if max_new_tokens is None else str(max_new_tokens)
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"longest answer in tokens (default: {default})")
    g.add_argument("--pooling", default=None, metavar="NAME",
                   help="how the passage rows are pooled: auto (default: replug over the "
                   "passages' scores, which the decoder's scorer supplies when missing; min_entropy without "
                   "scores), min_entropy, mean, max, replug, scored_entropy, posterior[:PRIOR[,online|,static]]")
    g.add_argument("--beta", type=float, default=None, metavar="B",
                   help="weight of the contrast against the no-passage row (default 0.25; 0 = off)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the answer at this string (repeatable; the string is not printed)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="sampling temperature, > 0 (default 1.0; used with --sample)")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: keep the smallest set of tokens with this much probability, in (0, 1] "
                   "(default 1.0 = off; with --sample)")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely tokens (default 0 = off; with --sample)")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed for --sample, 0 <= S < 2**64 (default: unseeded)")
    g.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="with --sample: drop tokens below P times the top token's probability (default off)")
    r = p.add_argument_group("repetition and banned tokens (applied to the fused scores, greedy or sampled)")
    r.add_argument("--repetition-penalty", type=float, default=None, metavar="X",
                   help="transformers' repetition penalty on the answer's own tokens (default 1.0 = off)")
    r.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help="no N-gram of tokens occurs twice in the answer (default 0 = off)")
    r.add_argument("--frequency-penalty", type=float, default=None, metavar="X",
                   help="OpenAI's frequency penalty in [-2, 2] (default 0 = off)")
    r.add_argument("--presence-penalty", type=float, default=None, metavar="X",
                   help="OpenAI's presence penalty in [-2, 2] (default 0 = off)")
    r.add_argument("--suppress-token", dest="suppress_tokens", type=int, action="append", default=None, metavar="ID",
                   help="a token id never generated (repeatable)")
    r.add_argument("--bad-word", dest="bad_words", action="append", default=None, metavar="TEXT",
                   help="a word or phrase never generated (repeatable; tokenized by the model's tokenizer)")


def decoding_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The :class:`NBCEConfig` overrides given on the command line, validated by
    ``NBCEConfig.validate`` now, before any model is loaded (a bad value raises
    :class:`~nbce_rag.errors.ConfigError`)."""
    from nbce_rag.config import NBCEConfig
    from nbce_rag.errors import ConfigError

    from nbce_rag.types import check_text

    for flag, dest in (("--stop", "stop"), ("--bad-word", "bad_words")):
        value = getattr(args, dest, None)
        for text in ([value] if isinstance(value, str) else value or []):
            if isinstance(text, str):
                check_text(text, flag)  # the flag the user typed, before NBCEConfig names its field
    options = {k: getattr(args, k) for k in _DECODING_DESTS if getattr(args, k, None) is not None}
    if getattr(args, "sample", False):
        options["do_sample"] = True
    NBCEConfig().update(**options)  # the one validation of every option (raises ConfigError)
    bad = getattr(args, "bad_words", None)
    if bad and not all(isinstance(w, str) and w.strip() for w in bad):
        raise ConfigError("--bad-word needs a non-empty word or phrase")
    return options


def bad_words_options(args: argparse.Namespace, tokenizer: Any) -> Dict[str, Any]:
    """``{"bad_words_ids": ...}`` for ``--bad-word`` (needs the loaded model's tokenizer, see
    :func:`nbce_rag.decoding.sampling.bad_words_ids`); ``{}`` when none was given."""
    words = getattr(args, "bad_words", None)
    if not words:
        return {}
    from nbce_rag.decoding.sampling import bad_words_ids

    return {"bad_words_ids": bad_words_ids(tokenizer, words)}


#: help of every ``--dtype`` (the LM's)
DTYPE_HELP = ("float32, bfloat16, float16 or auto (default: bf16 on CUDA and on a CPU with bf16 units (AMX / "
              "AVX512-BF16), fp16 on MPS, else fp32; $NBCE_RAG_CPU_DTYPE=fp32|bf16 sets the CPU's auto)")
ENCODER_DTYPE_HELP = ("compute dtype of the encoder: float32, bfloat16 or auto (default: bf16 on a CPU with bf16 "
                      "units, else fp32); the index stores float32 vectors either way")


def add_encoder_dtype(p: argparse.ArgumentParser) -> None:
    """``--encoder-dtype`` (see :attr:`nbce_rag.retrieval.encoder.CoSENTEncoder.dtype`)."""
    p.add_argument("--encoder-dtype", default=None, metavar="T", help=ENCODER_DTYPE_HELP)


def encoder_options(args: argparse.Namespace) -> dict:
    """``{"dtype": ...}`` for ``CoSENTEncoder.from_pretrained`` when ``--encoder-dtype`` was given."""
    dt = getattr(args, "encoder_dtype", None)
    return {} if dt is None else {"dtype": dt}


def check_device(device: Optional[str], dtype: Optional[str] = None, encoder_dtype: Optional[str] = None) -> None:
    """Reject an unknown ``--device``/``--dtype``/``--encoder-dtype`` before any model loads (ConfigError)."""
    from nbce_rag.errors import ConfigError, ModelLoadError
    from nbce_rag.models import resolve_device, resolve_dtype, resolve_encoder_dtype

    try:
        dev = resolve_device(device)
        resolve_dtype(dtype, dev)
        resolve_encoder_dtype(encoder_dtype, dev)
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None
