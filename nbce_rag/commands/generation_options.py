"""The sampling and repetition flags shared by ``nbce-rag generate`` and ``nbce-rag ask``
(NBCEConfig fields of the same names; see :mod:`nbce_rag.sampling`)."""

from __future__ import annotations

import argparse
from typing import Any, Dict


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """``--top-k``, ``--top-p``, ``--min-p``, ``--repetition-penalty``, ``--no-repeat-ngram-size``,
    ``--frequency-penalty``, ``--presence-penalty``, ``--suppress-token``, ``--bad-word``."""
    g = p.add_argument_group("sampling and repetition (unset: the NBCEConfig default)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="with --sample: keep the K likeliest tokens")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="with --sample: nucleus of mass P")
    g.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="with --sample: drop tokens below P times the top token's probability")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="X",
                   help="transformers' repetition penalty on the answer's own tokens (1.0 = off)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help="no N-gram of tokens occurs twice in the answer (0 = off)")
    g.add_argument("--frequency-penalty", type=float, default=None, metavar="X",
                   help="OpenAI's frequency penalty in [-2, 2] (0 = off)")
    g.add_argument("--presence-penalty", type=float, default=None, metavar="X",
                   help="OpenAI's presence penalty in [-2, 2] (0 = off)")
    g.add_argument("--suppress-token", type=int, action="append", default=None, metavar="ID",
                   help="a token id never generated (repeatable)")
    g.add_argument("--bad-word", action="append", default=None, metavar="TEXT",
                   help="a word or phrase never generated (repeatable; tokenized by the model's tokenizer)")


def generation_options(args: argparse.Namespace, tokenizer: Any = None) -> Dict[str, Any]:
    """The NBCEConfig options the flags set (unset flags are left out). ``--bad-word`` needs
    the model's ``tokenizer`` (see :func:`nbce_rag.sampling.bad_words_ids`)."""
    opts = {
        "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "frequency_penalty": args.frequency_penalty, "presence_penalty": args.presence_penalty,
        "suppress_tokens": args.suppress_token,
    }
    if args.bad_word:
        if tokenizer is None:
            raise ValueError("--bad-word needs the model's tokenizer")
        from ..sampling import bad_words_ids

        opts["bad_words_ids"] = bad_words_ids(tokenizer, args.bad_word)
    return {k: v for k, v in opts.items() if v is not None}
