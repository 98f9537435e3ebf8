"""``nbce-rag cache``: precompute the passage KV cache of an index for one model.

    nbce-rag cache --index DIR [--model M] [--device D] [--dtype T] [--out KVDIR] [--batch N]

Every chunk's ``[template prefix][chunk]`` keys and values are computed once and written as
safetensors shards under ``DIR/kvcache`` (or ``--out``), one folder per model namespace
(model, weights, dtype, device type, attention, library versions). ``nbce-rag ask`` and
``RAGPipeline.from_pretrained(index=DIR)`` then read them: a question costs its own tokens,
not the passages'. Chunks already cached are skipped, so it can be re-run after
``nbce-rag index --append``. The cache must be made with the model, dtype and device type
that will answer (a cache of another one is never used).
"""

from __future__ import annotations

import argparse

from nbce_rag.commands.arguments import DTYPE_HELP, examples


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "cache",
        help="precompute the passage KV cache of an index (faster answers: only the question is computed)",
        description="Compute the keys/values of every chunk of an index for one LLM and store them under "
        "DIR/kvcache (safetensors shards), so later questions reuse them exactly. Costs disk: about "
        "45 KiB per chunk token for the bundled model in fp32 (22.5 KiB in bf16).",
        epilog=examples(
            "nbce-rag cache --index my_index                       # bundled model, then: nbce-rag ask ... --index my_index",
            "nbce-rag cache --index my_index --model HuggingFaceTB/SmolLM2-360M-Instruct --device cuda --dtype bfloat16",
            "nbce-rag index more/ --out my_index --append && nbce-rag cache --index my_index   # only new chunks",
        ),
    )
    p.add_argument("--index", required=True, metavar="DIR", help="index directory (nbce-rag index)")
    p.add_argument("--out", default=None, metavar="KVDIR", help="where to write (default DIR/kvcache)")
    p.add_argument("--model", default=None, metavar="M",
                   help="LLM: HF id, local path or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps or auto (default); must match the one that answers")
    p.add_argument("--dtype", default=None, help=DTYPE_HELP + "; must match the one that answers")
    p.add_argument("--batch", type=int, default=32, metavar="N", help="chunks per shard (default 32)")
    p.set_defaults(func=run)


def check_writable(target) -> None:
    """Refuse (StoreError: exit 1, one line) a KV cache directory that cannot be written: a path
    that is a file, or a folder without write permission. Checked before any model loads."""
    import os
    import tempfile
    from pathlib import Path

    from nbce_rag.errors import StoreError

    target = Path(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "is not a directory" if target.exists() and not target.is_dir() else f"cannot be written ({e.strerror or e})"
        raise StoreError(f"the KV cache directory {target} {what}; nothing was cached. Give a writable "
                         "directory with --out (default: DIR/kvcache)") from None


def fill_index(index_dir, *, out=None, model=None, device=None, dtype=None, batch: int = 32, progress: bool = True):
    """Fill the KV cache of the index at ``index_dir`` (shared by ``cache`` and ``index --kv-cache``).
    The RAM level's budget is ``NBCE_RAG_KV_CACHE_BYTES`` when set (0 otherwise: entries go to disk).
    Raises :class:`~nbce_rag.errors.StoreError` when the store cannot be written or a shard was lost."""
    from nbce_rag.decoding.decoder import NBCEDecoder
    from nbce_rag.retrieval.index import VectorIndex
    from nbce_rag.decoding.kvcache import PassageKVCache, env_max_bytes, fill, index_kv_dir, index_texts
    from nbce_rag.errors import StoreError

    max_bytes = env_max_bytes() or 0  # a bad value: ConfigError naming the variable, before any load
    index = VectorIndex.load(index_dir)
    target = out or index_kv_dir(index_dir)
    check_writable(target)
    dec = NBCEDecoder.from_pretrained(model, device=device, dtype=dtype,
                                      kv_cache=PassageKVCache(max_bytes=max_bytes, disk=target))
    st = fill(dec, index_texts(index), batch_passages=batch, show_progress=progress)
    errors = dec.kv_cache.write_errors
    if errors:
        raise StoreError(f"{len(errors)} KV cache shard(s) could not be written to {target} ({errors[0]}); "
                         "the cache is incomplete: free space or fix the permissions, then run nbce-rag cache again "
                         "(chunks already stored are skipped)")
    return st, dec.kv_cache.disk


def run(args: argparse.Namespace) -> int:
    import time

    from nbce_rag.errors import ConfigError

    if args.batch < 1:
        raise ConfigError("--batch must be >= 1")
    t0 = time.perf_counter()
    st, disk = fill_index(args.index, out=args.out, model=args.model, device=args.device, dtype=args.dtype,
                          batch=args.batch)
    dt = time.perf_counter() - t0
    print(f"{disk.root}: {st.stored} chunk(s) cached, {st.hits} already there ({st.prompt_tokens} token positions); "
          f"{disk.nbytes() / 2**20:.1f} MiB on disk ({dt:.1f}s)")
    return 0
