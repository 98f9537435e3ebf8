"""``nbce-rag ask`` / ``nbce-rag chat``: retrieve, filter and answer questions from an index,
with sources.

    nbce-rag ask "question" --index DIR [-k K] [--stream] [--json] [decoding options]
    nbce-rag ask --index DIR            # no question: read questions from stdin, one per line
    nbce-rag chat --index DIR           # the same loop

The answer is printed (streamed as it is decoded with ``--stream``), then the command says
whether it is supported (some passage passed the filter) and lists the passages that reached
the decoder, numbered, with their cosine score, id and share of the answer's tokens. Without a
question, the index and the models are loaded once and questions are read in a loop (an empty
line is skipped; ``exit``, ``quit`` or end of input stops).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Any, TextIO

from nbce_rag.commands.arguments import (DTYPE_HELP, add_decoding_options, add_encoder_dtype, bad_words_options, add_question,
                                        check_device, decoding_options, encoder_options, examples, positive_int, question_of)

_QUIT = {"exit", "quit", ":q"}


def register(subparsers: "argparse._SubParsersAction") -> None:
    desc = ("Retrieve the top-k chunks of the index for each question, keep those that pass the calibrated "
            "filter (calibration.json in the index directory, from `nbce-rag calibrate`), and answer with NBCE "
            "decoding, one row per kept passage. The answer is marked supported when the best candidate passes "
            "the calibration's support threshold; when no passage passes the filter, the answer says that nothing "
            "in the documents answers the question (--on-unsupported closed_book: the model answers alone, "
            "marked unsupported). Options are checked before anything loads.")
    p = subparsers.add_parser(
        "ask",
        help="answer a question from an index (retrieve -> filter -> NBCE), with sources",
        description=desc + " Without a question, questions are read from stdin in a loop with the models loaded "
        "once (like `nbce-rag chat`).",
        epilog=examples(
            'nbce-rag ask "How do I open a file?" --index my_index',
            'nbce-rag ask "What does pass do?" --index my_index -k 5 --stream --max-new-tokens 128',
            'nbce-rag ask -q "What does pass do?" --index my_index --json --no-filter',
            'nbce-rag ask --index my_index < questions.txt   # one question per line, models loaded once',
        ),
    )
    add_question(p, required=False,
                 help="the question (several words are joined with spaces); none: read questions from stdin")
    _add_options(p)
    c = subparsers.add_parser(
        "chat",
        help="answer questions typed one per line (models loaded once), with sources",
        description=desc + " Questions are read from stdin, one per line; an empty line is skipped, "
        "`exit`, `quit` or end of input (Ctrl-D) stops.",
        epilog=examples(
            "nbce-rag chat --index my_index",
            "nbce-rag chat --index my_index --stream -k 5",
            "printf 'What is NBCE?\\nWhat does pass do?\\n' | nbce-rag chat --index my_index --json",
        ),
    )
    c.set_defaults(question=[], question_opt=None, _question_dest="question", _question_required=False)
    _add_options(c)


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="DIR", help="index directory (nbce-rag index)")
    p.add_argument("-k", "--k", type=positive_int, default=10, help="candidates retrieved before the filter (default 10)")
    p.add_argument("--model", default=None, metavar="M",
                   help="LLM: HF id, local path or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--encoder", default=None, metavar="E",
                   help="query encoder directory or id (default: the one recorded in the index; must match it)")
    p.add_argument("--no-filter", action="store_true",
                   help="no calibrated filter: every top-k candidate reaches the decoder")
    p.add_argument("--on-unsupported", choices=("abstain", "closed_book"), default=None,
                   help="when no candidate passes the filter: 'abstain' (default: say that nothing in the documents "
                   "answers it, no decoding) or 'closed_book' (the model answers alone, marked unsupported)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps or auto (default)")
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)
    add_encoder_dtype(p)
    add_decoding_options(p)
    p.add_argument("--stream", action="store_true", help="print the answer token by token as it is decoded")
    p.add_argument("--json", action="store_true",
                   help="print each answer (sources, dropped candidates, usage) as one JSON object")
    p.add_argument("--width", type=positive_int, default=100, help="characters of each source to print (default 100)")
    p.set_defaults(func=run)


def print_sources(ans: Any, out: Optional[TextIO] = None, width: int = 100) -> None:
    """The supported/unsupported verdict (the filter's support decision, with its score and
    threshold) and the numbered passages that reached the decoder."""
    out = out or sys.stdout  # looked up at call time: sys.stdout may be replaced after import
    n_dropped = len(ans.dropped)
    dropped = f", {n_dropped} candidate(s) dropped by the filter" if n_dropped else ""
    score, thr = getattr(ans, "support_score", None), getattr(ans, "support_threshold", None)
    how = getattr(ans, "answered_from", "passages")
    vs = (f"best candidate {score:.3f} {'>=' if ans.supported else '<'} support threshold {thr:.3f}; "
          if score is not None and thr is not None else "")
    if ans.supported:
        print(f"Supported: yes ({vs}{len(ans.sources)} passage(s) reached the decoder{dropped})", file=out)
    elif how == "abstained":
        print(f"Supported: no -- nothing in the documents answers this question: no candidate passed the filter "
              f"({vs}nothing decoded{dropped}); --on-unsupported closed_book lets the model answer alone", file=out)
    elif how == "closed_book" or not ans.sources:
        extra = f" ({vs.rstrip('; ')})" if vs else ""
        print("Supported: no -- no passage passed the filter, so the answer above comes from the model alone "
              f"(closed-book) and may be wrong{extra}{dropped}", file=out)
    else:
        print(f"Supported: no -- weak evidence ({vs}{len(ans.sources)} passage(s) passed the keep rule and were "
              f"decoded{dropped}): check the answer against the sources", file=out)
    if getattr(ans, "calibration", None):
        print(f"Filter: {ans.calibration}", file=out)
    if not ans.sources:
        return
    print("Sources:", file=out)
    for i, s in enumerate(ans.sources, 1):
        score = "   n/a" if s.score is None else f"{s.score:.4f}"
        label = s.id or f"passage {s.index}"
        text = " ".join(s.text.split())
        if len(text) > width:
            text = text[: max(1, width - 1)] + "\u2026"
        print(f"  [{i}] score {score}  {label}  share {s.share:.0%} ({s.n_tokens} tokens)", file=out)
        print(f"      {text}", file=out)


def run(args: argparse.Namespace) -> int:
    # everything the user gave is checked before the index and the models load
    question = question_of(args)
    options = decoding_options(args)
    if args.on_unsupported:
        options["on_unsupported"] = args.on_unsupported
    check_device(args.device, args.dtype, args.encoder_dtype)

    from nbce_rag.pipeline import RAGPipeline

    encoder = None
    if args.encoder:
        from nbce_rag.retrieval.encoder import CoSENTEncoder

        encoder = CoSENTEncoder.from_pretrained(args.encoder, device=args.device, **encoder_options(args))
    rag = RAGPipeline.from_pretrained(
        index=args.index,
        model=args.model,
        encoder=encoder,
        threshold=None if args.no_filter else "auto",
        k=args.k,
        device=args.device,
        dtype=args.dtype,
        encoder_dtype=args.encoder_dtype,
    )
    options.update(bad_words_options(args, rag.decoder.tokenizer))
    if question is not None:
        answer_one(rag, question, options, args)
        return 0
    return _loop(rag, options, args)


def answer_one(rag: Any, question: str, options: dict, args: argparse.Namespace, out: Optional[TextIO] = None) -> None:
    """Answer one question and print it as ``args`` asks (``--json``, ``--stream``, ``--width``)."""
    import json

    out = out or sys.stdout
    if args.json:
        d = rag.ask(question, **options).to_dict()
        d["question"] = question
        print(json.dumps(d, indent=None if getattr(args, "_loop", False) else 2,
                         ensure_ascii=False), file=out, flush=True)
        return
    if args.stream:
        ans = None
        for ev in rag.stream(question, **options):
            if ev.text:
                out.write(ev.text)
                out.flush()
            ans = ev.answer or ans
        print("\n", file=out)
    else:
        ans = rag.ask(question, **options)
        print(ans.text.strip() + "\n", file=out)
    print_sources(ans, out=out, width=args.width)
    last = getattr(getattr(rag.decoder, "kv_cache", None), "last", None)  # passage KV cache of this answer
    if last is not None and getattr(ans, "answered_from", None) != "abstained":  # abstained: nothing decoded
        print(last.summary(), file=out)


def _loop(rag: Any, options: dict, args: argparse.Namespace) -> int:
    """Questions from stdin, one per line, with the loaded pipeline; a bad question is reported
    and the loop goes on. ``--json`` prints one JSON object per line (JSONL)."""
    from nbce_rag.cli import exit_code, one_line

    args._loop = True
    try:  # a line that is not UTF-8 is reported as such (check_text), not a decoding crash
        sys.stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError):  # a replaced stdin (tests, embedding)
        pass
    interactive = sys.stdin.isatty()
    if interactive:
        print("Ask a question (empty line: skip; exit, quit or Ctrl-D: stop).", file=sys.stderr)
    codes = set()  # the exit status of each failed question (nbce_rag.cli.exit_code)
    while True:
        if interactive:
            print("? ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        question = line.strip()
        if not question:
            continue
        if question.lower() in _QUIT:
            break
        try:
            answer_one(rag, question, options, args)
        except Exception as e:  # noqa: BLE001 - report a bad question, keep the session
            code = exit_code(e)
            if code is None:
                raise
            codes.add(code)
            print(f"nbce-rag {args.command}: error: {one_line(e)}", file=sys.stderr)
        if not args.json:
            print(file=sys.stdout, flush=True)
    # one convention with `ask "question"`: 2 when a question was bad input, 1 when one failed at
    # run time (that wins: something is wrong beyond the input), 0 when every question was answered
    return 1 if 1 in codes else max(codes, default=0)
