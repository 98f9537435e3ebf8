"""``nbce-rag index``: chunk, embed and store documents in an index directory.

    nbce-rag index PATH... --out DIR [--encoder E] [--chunk-tokens N] [--overlap N]
                   [--backend exact|faiss] [--append] [--delete DOC_ID ...]

PATH is a file or a directory (walked recursively); the file types read are those of
:func:`nbce_rag.retrieval.readers.read_documents` (``TEXT_EXTENSIONS``, ``JSONL_EXTENSIONS`` and, with the
``pdf`` extra, ``PDF_EXTENSIONS``), listed by ``--help`` from those same constants. Empty
documents are skipped and counted; unreadable files are named and skipped; non-UTF-8 bytes are
replaced (with a warning).
"""

from __future__ import annotations

import argparse
import sys

from nbce_rag.commands.arguments import add_encoder_dtype, encoder_options, examples, nonnegative_int, positive_int


def accepted_file_types() -> str:
    """The extensions ``nbce-rag index`` reads, from the constants the folder reader uses."""
    from nbce_rag.retrieval.readers import JSONL_EXTENSIONS, PDF_EXTENSIONS, TEXT_EXTENSIONS

    return " ".join(TEXT_EXTENSIONS + JSONL_EXTENSIONS) + " [" + " ".join(PDF_EXTENSIONS) + " with the pdf extra]"


def register(subparsers: "argparse._SubParsersAction") -> None:
    from nbce_rag.retrieval.chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP

    types = accepted_file_types()
    p = subparsers.add_parser(
        "index",
        help=f"chunk, embed and store documents ({types}) in an index directory",
        description="Chunk documents by encoder tokens (never inside a word), embed them with the "
        "CoSENT encoder and write an index directory (JSON manifest + .npy vectors + JSONL records, "
        f"saved atomically). Files read: {types}; JSONL: one document per row (text or contents, optional "
        "title, id, metadata); files of other types in a folder are counted and ignored. Without --append an "
        "existing index at --out is replaced. Options are checked before the encoder loads.",
        epilog=examples(
            "nbce-rag index docs/ --out my_index",
            "nbce-rag index notes.md corpus.jsonl --out my_index --chunk-tokens 200 --overlap 20",
            "nbce-rag index new_docs/ --out my_index --append          # add (same ids are replaced)",
            "nbce-rag index --out my_index --delete old.md             # remove a document",
            "nbce-rag index docs/ --out my_index --encoder my_encoder --backend faiss --faiss-factory HNSW32",
        ),
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help=f"files or directories (recursive); types: {types}")
    p.add_argument("--out", required=True, metavar="DIR", help="index directory to write")
    p.add_argument("--encoder", default=None, metavar="E",
                   help="encoder: a directory (e.g. from nbce-rag train) or model id "
                   "(default: the bundled all-MiniLM-L6-v2; with --append: the index's own)")
    add_encoder_dtype(p)
    p.add_argument("--chunk-tokens", type=positive_int, default=DEFAULT_CHUNK_TOKENS,
                   help=f"chunk size in encoder tokens (default {DEFAULT_CHUNK_TOKENS})")
    p.add_argument("--overlap", type=nonnegative_int, default=DEFAULT_OVERLAP,
                   help=f"tokens shared by consecutive chunks (default {DEFAULT_OVERLAP})")
    p.add_argument("--backend", choices=["exact", "faiss"], default="exact",
                   help="search backend: exact cosine (default) or FAISS (the faiss extra)")
    p.add_argument("--faiss-factory", default="Flat",
                   help="FAISS index_factory string, e.g. Flat (exact), HNSW32, IVF1024,Flat (default Flat)")
    p.add_argument("--append", action="store_true",
                   help="add to the index at --out; documents with an id already there are replaced")
    p.add_argument("--delete", action="append", default=[], metavar="DOC_ID",
                   help="remove a document (or chunk id) from the index at --out; repeatable")
    p.add_argument("--batch-size", type=positive_int, default=32, help="chunks per encoder batch (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while embedding")
    p.add_argument("--kv-cache", action="store_true",
                   help="also precompute the passage KV cache for --model (as `nbce-rag cache`; costs disk)")
    p.add_argument("--model", default=None, metavar="M", help="LLM of --kv-cache and --calibrate (default: the bundled one)")
    p.add_argument("--calibrate", action="store_true",
                   help="then self-calibrate the filter on questions the LM writes about the chunks "
                   "(= nbce-rag calibrate --synthetic --index OUT --model M; --calibrate-n chunks)")
    p.add_argument("--calibrate-n", type=positive_int, default=200, metavar="N",
                   help="chunks to write a question about with --calibrate (default 200)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from nbce_rag.retrieval.encoder import CoSENTEncoder
    from nbce_rag.errors import ConfigError
    from nbce_rag.retrieval.index import MANIFEST, VectorIndex
    from nbce_rag.retrieval.readers import read_documents

    if not args.paths and not args.delete:
        raise ConfigError("give at least one PATH to index (or --delete DOC_ID with --out DIR)")
    if not args.overlap < args.chunk_tokens:
        raise ConfigError(f"--overlap must be smaller than --chunk-tokens ({args.chunk_tokens}), got {args.overlap}")
    # embedding is the long step (38 s for 23 files on a laptop CPU, and a single batch can take
    # seconds): the bar (tqdm, on stderr) is always on here, not only above the library's 16 batches
    progress = not args.no_progress
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
        enc = CoSENTEncoder.from_pretrained(args.encoder, **encoder_options(args)) if args.encoder else None
        index = VectorIndex.load(out, enc)
        if args.encoder_dtype is not None and enc is None:
            index.encoder.dtype = args.encoder_dtype
        before = len(index)
        if args.delete:
            n = index.delete(args.delete)
            print(f"deleted {n} chunk(s)", file=sys.stderr)
        if docs:
            index.add(docs, on_duplicate="replace", batch_size=args.batch_size, show_progress_bar=progress)
        action = f"updated ({before} -> {len(index)} chunks)"
    else:
        enc = CoSENTEncoder.from_pretrained(args.encoder, **encoder_options(args))
        index = VectorIndex.build(
            enc,
            docs,
            chunk_tokens=args.chunk_tokens,
            overlap=args.overlap,
            backend=args.backend,
            faiss_factory=args.faiss_factory,
            batch_size=args.batch_size,
            show_progress_bar=progress,
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
        from nbce_rag.commands.cache import fill_index

        st, disk = fill_index(out, model=args.model)
        print(f"{disk.root}: {st.stored} chunk(s) KV-cached, {st.hits} already there; {disk.nbytes() / 2**20:.1f} MiB")
    if args.calibrate:
        from nbce_rag.commands.calibrate import main_synthetic

        return main_synthetic(out, n=args.calibrate_n, model=args.model, n_option="--calibrate-n")
    return 0
