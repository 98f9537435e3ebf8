"""``nbce-rag search``: print the best chunks of an index for a query, with cosine scores.

    nbce-rag search --index DIR "query" [-k K] [--json] [--encoder E]
"""

from __future__ import annotations

import argparse

from nbce_rag.commands.arguments import add_encoder_dtype, add_question, encoder_options, examples, positive_int, question_of


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "search",
        help="search an index and print the hits with their cosine scores",
        description="Embed the query with the index's encoder and print the k most similar chunks "
        "(score = cosine similarity).",
        epilog=examples(
            'nbce-rag search "open a file" --index my_index',
            'nbce-rag search "open a file" --index my_index -k 3 --json',
            'nbce-rag search -q "context managers" --index my_index --width 400',
        ),
    )
    add_question(p, required=True, what="query")
    p.add_argument("--index", required=True, metavar="DIR", help="index directory (nbce-rag index)")
    p.add_argument("-k", "--k", type=positive_int, default=10, help="number of hits (default 10)")
    p.add_argument("--json", action="store_true", help="print the hits as a JSON list")
    p.add_argument("--encoder", default=None, metavar="E",
                   help="encoder directory or id (default: the one recorded in the index; must match it)")
    add_encoder_dtype(p)
    p.add_argument("--backend", choices=["exact", "faiss"], default=None,
                   help="override the index's search backend")
    p.add_argument("--width", type=positive_int, default=200, help="characters of each hit to print (default 200)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    query = question_of(args)  # checked before the index and its encoder load

    from nbce_rag.retrieval.encoder import CoSENTEncoder
    from nbce_rag.retrieval.index import VectorIndex

    enc = CoSENTEncoder.from_pretrained(args.encoder, **encoder_options(args)) if args.encoder else None
    index = VectorIndex.load(args.index, enc, backend=args.backend)
    if args.encoder_dtype is not None and enc is None:
        index.encoder.dtype = args.encoder_dtype
    hits = index.search(query, k=args.k)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
        return 0
    if not hits:
        print("(the index is empty)")
        return 0
    for rank, h in enumerate(hits, 1):
        m = h.metadata
        where = m.get("source") or m.get("doc_id", "")
        span = f", chars {m['start']}-{m['end']}" if "start" in m else ""
        text = " ".join(h.text.split())
        if len(text) > args.width:
            text = text[: args.width - 1] + "\u2026"
        print(f"{rank:>3}. {h.score:.4f}  {h.id}  ({where}{span})")
        print(f"     {text}")
    return 0
