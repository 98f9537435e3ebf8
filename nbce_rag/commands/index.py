"""``nbce-rag index``: chunk, embed and store documents in an index directory.

    nbce-rag index PATH... --out DIR [--encoder E] [--chunk-tokens N] [--overlap N]
                   [--backend exact|faiss] [--append] [--delete DOC_ID ...]

PATH is a file or a directory (walked recursively): ``.txt``, ``.md``, ``.rst``, ``.jsonl``
(one document per row: ``text`` or ``contents``, optional ``title``/``id``/``metadata``) and
``.pdf`` with the ``pdf`` extra. Empty documents are skipped and counted; unreadable files
are named and skipped; non-UTF-8 bytes are replaced (with a warning).
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: "argparse._SubParsersAction") -> None:
    from ..chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP

    p = subparsers.add_parser(
        "index",
        help="chunk, embed and store documents (.txt .md .jsonl [.pdf]) in an index directory",
        description="Chunk documents by encoder tokens (never inside a word), embed them with the "
        "CoSENT encoder and write an index directory (JSON manifest + .npy vectors + JSONL records, "
        "saved atomically). Without --append an existing index at --out is replaced.",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="files or directories (recursive)")
    p.add_argument("--out", required=True, metavar="DIR", help="index directory to write")
    p.add_argument("--encoder", default=None, metavar="E",
                   help="encoder: a directory (e.g. from nbce-rag train) or model id "
                   "(default: the bundled all-MiniLM-L6-v2; with --append: the index's own)")
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                   help=f"chunk size in encoder tokens (default {DEFAULT_CHUNK_TOKENS})")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                   help=f"tokens shared by consecutive chunks (default {DEFAULT_OVERLAP})")
    p.add_argument("--backend", choices=["exact", "faiss"], default="exact",
                   help="search backend: exact cosine (default) or FAISS (the faiss extra)")
    p.add_argument("--faiss-factory", default="Flat",
                   help="FAISS index_factory string, e.g. Flat (exact), HNSW32, IVF1024,Flat (default Flat)")
    p.add_argument("--append", action="store_true",
                   help="add to the index at --out; documents with an id already there are replaced")
    p.add_argument("--delete", action="append", default=[], metavar="DOC_ID",
                   help="remove a document (or chunk id) from the index at --out; repeatable")
    p.add_argument("--batch-size", type=int, default=32, help="encode batch size (default 32)")
    p.add_argument("--kv-cache", action="store_true",
                   help="also precompute the passage KV cache for --model (as `nbce-rag cache`; costs disk)")
    p.add_argument("--model", default=None, metavar="M", help="LLM of --kv-cache and --calibrate (default: the bundled one)")
    p.add_argument("--calibrate", action="store_true",
                   help="then self-calibrate the filter on questions the LM writes about the chunks "
                   "(= nbce-rag calibrate --synthetic --index OUT --model M; --calibrate-n chunks)")
    p.add_argument("--calibrate-n", type=int, default=200, metavar="N",
                   help="chunks to write a question about with --calibrate (default 200)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ..encoder import CoSENTEncoder
    from ..errors import ConfigError
    from ..index import MANIFEST, VectorIndex
    from ..readers import read_documents

    if not args.paths and not args.delete:
        raise ConfigError("give at least one PATH to index (or --delete DOC_ID with --out DIR)")
    out = Path(args.out)
    t0 = time.perf_counter()
    docs, report = read_documents(args.paths) if args.paths else ([], None)
    if report is not None:
        for line in report.lines():
            print(line, file=sys.stderr)
        if not docs and not args.delete:
            raise ConfigError("no documents to index (all files were empty, unreadable or of other types)")

    existing = (out / MANIFEST).is_file()
    if args.append or args.delete:
        if not existing:
            raise ConfigError(f"--append/--delete need an index at {out}, and there is none")
        enc = CoSENTEncoder.from_pretrained(args.encoder) if args.encoder else None
        index = VectorIndex.load(out, enc)
        before = len(index)
        if args.delete:
            n = index.delete(args.delete)
            print(f"deleted {n} chunk(s)", file=sys.stderr)
        if docs:
            index.add(docs, on_duplicate="replace", batch_size=args.batch_size)
        action = f"updated ({before} -> {len(index)} chunks)"
    else:
        enc = CoSENTEncoder.from_pretrained(args.encoder)
        index = VectorIndex.build(
            enc,
            docs,
            chunk_tokens=args.chunk_tokens,
            overlap=args.overlap,
            backend=args.backend,
            faiss_factory=args.faiss_factory,
            batch_size=args.batch_size,
        )
        action = "replaced the existing index" if existing else "created"
    rep = index.last_report
    index.save(out)
    dt = time.perf_counter() - t0
    if rep is not None:
        empty = rep.skipped_empty + (report.skipped_empty if report is not None else 0)
        extra = f", {empty} empty skipped" if empty else ""
        if rep.oversized_chunks:
            extra += f", {rep.oversized_chunks} chunk(s) of one over-long word (truncated by the encoder)"
        print(f"indexed {rep.added_documents} document(s) as {rep.chunks} chunk(s){extra}")
    print(f"{out}: {action}; {len(index)} chunks, dim {index.dim}, encoder {index.encoder_identity} ({dt:.1f}s)")
    if args.kv_cache:
        from .cache import fill_index

        st, disk = fill_index(out, model=args.model)
        print(f"{disk.root}: {st.stored} chunk(s) KV-cached, {st.hits} already there; {disk.nbytes() / 2**20:.1f} MiB")
    if args.calibrate:
        from .calibrate import main_synthetic

        return main_synthetic(out, n=args.calibrate_n, model=args.model)
    return 0
