"""``nbce-rag ask``: retrieve, filter and answer a question from an index, with sources.

    nbce-rag ask "question" --index DIR [-k K] [--max-new-tokens N] [--json]
                 [--model M] [--encoder E] [--no-filter]

The answer streams as it is decoded, then the command says whether it is supported (some
passage passed the filter) and lists the passages that reached the decoder, numbered, with
their cosine score, id and share of the answer's tokens.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Any, TextIO


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "ask",
        help="answer a question from an index (retrieve -> filter -> NBCE), with sources",
        description="Retrieve the top-k chunks of the index for QUESTION, keep those that pass the "
        "calibrated filter (calibration.json in the index directory, from `nbce-rag calibrate`), and "
        "answer with NBCE decoding, one row per kept passage. When no passage passes, the answer is "
        "closed-book and marked unsupported.",
    )
    p.add_argument("question", nargs="+", help="the question (several words are joined with spaces)")
    p.add_argument("--index", required=True, metavar="DIR", help="index directory (nbce-rag index)")
    p.add_argument("-k", "--k", type=int, default=10, help="candidates retrieved before the filter (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="longest answer in tokens (default: the decoder's, 64)")
    p.add_argument("--json", action="store_true", help="print the whole answer (sources, dropped candidates) as JSON")
    p.add_argument("--model", default=None, metavar="M",
                   help="LLM: HF id, local path or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--encoder", default=None, metavar="E",
                   help="query encoder directory or id (default: the one recorded in the index; must match it)")
    p.add_argument("--no-filter", action="store_true",
                   help="no calibrated filter: every top-k candidate reaches the decoder")
    p.add_argument("--device", default=None, help="cpu, cuda, mps or auto (default)")
    p.add_argument("--width", type=int, default=100, help="characters of each source to print (default 100)")
    p.set_defaults(func=run)


def print_sources(ans: Any, out: Optional[TextIO] = None, width: int = 100) -> None:
    """The supported/unsupported verdict and the numbered passages that reached the decoder."""
    out = out or sys.stdout  # looked up at call time: sys.stdout may be replaced after import
    n_dropped = len(ans.dropped)
    if ans.supported:
        note = f"{len(ans.sources)} passage(s) reached the decoder"
        if n_dropped:
            note += f", {n_dropped} candidate(s) dropped by the filter"
        print(f"Supported: yes ({note})", file=out)
    else:
        print("Supported: no -- nothing in the index answers this question: no passage passed the filter, "
              "so the answer above comes from the model alone (closed-book) and may be wrong"
              f"{f' ({n_dropped} candidate(s) dropped)' if n_dropped else ''}", file=out)
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
    import json

    from ..pipeline import RAGPipeline

    question = " ".join(args.question)
    if args.k < 1:
        print("nbce-rag ask: error: -k must be >= 1", file=sys.stderr)
        return 2
    encoder = None
    if args.encoder:
        from ..encoder import CoSENTEncoder

        encoder = CoSENTEncoder.from_pretrained(args.encoder)
    rag = RAGPipeline.from_pretrained(
        index=args.index,
        model=args.model,
        encoder=encoder,
        threshold=None if args.no_filter else "auto",
        k=args.k,
        device=args.device,
    )
    options = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    if args.json:
        ans = rag.ask(question, **options)
        d = ans.to_dict()
        d["question"] = question
        print(json.dumps(d, indent=2, ensure_ascii=False))
        return 0
    ans = None
    for ev in rag.stream(question, **options):
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        ans = ev.answer or ans
    print("\n")
    print_sources(ans, width=args.width)
    last = getattr(rag.decoder.kv_cache, "last", None)  # passage KV cache of this answer
    if last is not None:
        print(last.summary())
    return 0
