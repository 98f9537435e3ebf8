"""``nbce-rag generate``: answer a question from passages given on the command line."""

from __future__ import annotations

import argparse
import json
import sys

from .generation_options import add_generation_flags, generation_options


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "generate",
        help="answer a question from passages with NBCE (no retrieval)",
        description="Answer QUESTION from the given passages, one NBCE row per passage, and print "
        "the answer with the passages it drew on.",
    )
    p.add_argument("--question", "-q", required=True, help="the question")
    p.add_argument("--passage", "-p", action="append", default=[], metavar="TEXT",
                   help="a passage (repeat for several); '@FILE' reads one from a file")
    p.add_argument("--model", default=None, help="HF id, local path or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps or auto (default)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--pooling", default=None, help="auto (default), min_entropy, mean, max, replug, scored_entropy")
    p.add_argument("--beta", type=float, default=None, help="contrast weight (default 0.25)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    add_generation_flags(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    p.set_defaults(func=run)


def _read_passages(items):
    out = []
    for item in items:
        if item.startswith("@"):
            with open(item[1:], "r", encoding="utf-8", errors="replace") as f:
                out.append(f.read())
        else:
            out.append(item)
    return out


def print_answer(ans, out=None) -> None:
    """Print the answer and the numbered passages it drew on."""
    out = out or sys.stdout  # looked up at call time: sys.stdout may be replaced after import
    print(ans.text.strip(), file=out)
    print(file=out)
    if not ans.supported:
        print("(unsupported: no passage backed this answer; it comes from the model alone)", file=out)
    cited = ans.cited
    if cited:
        print("Sources:", file=out)
        for s in cited:
            label = s.id or f"passage {s.index}"
            score = "" if s.score is None else f", score {s.score:.3f}"
            snippet = " ".join(s.text.split())
            snippet = snippet[:100] + ("…" if len(snippet) > 100 else "")
            print(f"  [{s.index + 1}] {label}: {s.share:.0%} of tokens{score} — {snippet}", file=out)


def run(args) -> int:
    from ..decoder import NBCEDecoder

    passages = _read_passages(args.passage)
    options = {"max_new_tokens": args.max_new_tokens, "pooling": args.pooling, "beta": args.beta,
               "stop": args.stop, "temperature": args.temperature, "seed": args.seed}
    if args.sample:
        options["do_sample"] = True
    options = {k: v for k, v in options.items() if v is not None}
    dec = NBCEDecoder.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    options.update(generation_options(args, dec.tokenizer))
    if args.stream and not args.json:
        ans = None
        for ev in dec.stream(args.question, passages, **options):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            ans = ev.answer or ans
        print()
        ans.text = ""
        print_answer(ans)
        return 0
    ans = dec.generate(args.question, passages, **options)
    if args.json:
        print(json.dumps(ans.to_dict(), indent=2, ensure_ascii=False))
    else:
        print_answer(ans)
    return 0
