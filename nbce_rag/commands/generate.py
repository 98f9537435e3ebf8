"""``nbce-rag generate``: answer a question from passages given on the command line."""

from __future__ import annotations

import argparse
import json
import sys

from nbce_rag.commands.arguments import DTYPE_HELP, add_decoding_options, bad_words_options, add_question, check_device, decoding_options, examples, question_of


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "generate",
        help="answer a question from passages with NBCE (no retrieval)",
        description="Answer QUESTION from the given passages, one NBCE row per passage, and print "
        "the answer with the passages it drew on. Options are checked before the model loads.",
        epilog=examples(
            'nbce-rag generate "When was the tower built?" -p "The Eiffel Tower was completed in 1889." '
            '-p "Paris is the capital of France."',
            'nbce-rag generate "Summarise the notes" -p @notes1.txt -p @notes2.txt --max-new-tokens 128 --stream',
            'nbce-rag generate -q "Who wrote it?" -p @a.txt --sample --temperature 0.7 --seed 1 --json',
        ),
    )
    add_question(p, required=True)
    p.add_argument("--passage", "-p", action="append", default=[], metavar="TEXT",
                   help="a passage (repeat for several; each is one NBCE row); '@FILE' reads one from a file")
    p.add_argument("--model", default=None, metavar="M",
                   help="LLM: HF id, local path or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps or auto (default)")
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)
    add_decoding_options(p, max_new_tokens=64)
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--json", action="store_true", help="print the whole answer (text, sources, usage) as JSON")
    p.set_defaults(func=run)


def _read_passages(items):
    from nbce_rag.types import check_text

    out = []
    for i, item in enumerate(items, 1):
        if item.startswith("@"):
            with open(item[1:], "rb") as f:
                raw = f.read()
            try:
                out.append(raw.decode("utf-8").lstrip("\ufeff"))
            except UnicodeDecodeError as e:  # never replaced silently: the passage would not be what the file says
                from nbce_rag.errors import InvalidTextError

                raise InvalidTextError(f"--passage {i} ({item[1:]}) is not valid UTF-8: byte 0x{raw[e.start]:02X} at "
                                       f"offset {e.start}; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                                       field=f"--passage {i}") from None
        else:
            out.append(check_text(item, f"--passage {i}"))
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
    # everything the user gave is checked before the model loads (bad input: exit 2, one line)
    question = question_of(args)
    options = decoding_options(args)
    check_device(args.device, args.dtype)
    passages = _read_passages(args.passage)

    from nbce_rag.decoding.decoder import NBCEDecoder

    dec = NBCEDecoder.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    options.update(bad_words_options(args, dec.tokenizer))
    if args.stream and not args.json:
        ans = None
        for ev in dec.stream(question, passages, **options):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            ans = ev.answer or ans
        print()
        ans.text = ""
        print_answer(ans)
        return 0
    ans = dec.generate(question, passages, **options)
    if args.json:
        print(json.dumps(ans.to_dict(), indent=2, ensure_ascii=False))
    else:
        print_answer(ans)
    return 0
