"""Retriever benchmarks: CoSENT fine-tuning (STS-B, SciFact), encode throughput, search latency.

Usage (from the repository root; data defaults to ../shared/data)::

    python benchmarks/bench_encoder.py stsb     [--data DIR] [--model-out /tmp/nbce_bench/stsb_model]
    python benchmarks/bench_encoder.py scifact  [--data DIR] [--model-out /tmp/nbce_bench/scifact_model]
                                                [--epochs 1] [--max-train-pairs N]
    python benchmarks/bench_encoder.py throughput [--n 2000]
    python benchmarks/bench_encoder.py latency  [--sizes 10000 100000 1000000]
    python benchmarks/bench_encoder.py plot

Each writes ``benchmarks/results/<name>.json``; ``plot`` draws ``benchmarks/results/*.png``.
Data sets are never copied into the repository; a missing data folder ends the run with a
message and exit status 0. No model is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = (ROOT / ".." / "shared" / "data").resolve()

import numpy as np  # noqa: E402

logger = logging.getLogger("bench_encoder")


def machine() -> Dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def write_result(name: str, obj: Dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    obj = {**obj, "machine": machine(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def need(path: Path, what: str) -> bool:
    if not path.exists():
        print(f"{what} not found at {path}; pass --data DIR (skipping this benchmark)")
        return False
    return True


# --------------------------------------------------------------------------- STS-B


def bench_stsb(args: argparse.Namespace) -> int:
    from nbce_rag.data import read_stsb
    from nbce_rag.encoder import CoSENTEncoder

    d = Path(args.data) / "stsb"
    if not need(d / "sts-train.csv", "STS-B"):
        return 0
    train, dev, test = (read_stsb(d / f"sts-{s}.csv") for s in ("train", "dev", "test"))
    if args.max_train_pairs:
        train = train[: args.max_train_pairs]
    enc = CoSENTEncoder.from_pretrained()
    before = enc.evaluate(test)
    print(f"STS-B test before: {before}")
    opts = {}
    if args.epochs:
        opts["epochs"] = args.epochs
    report = enc.fit(train, dev, **opts)
    after = enc.evaluate(test)
    print(f"STS-B test after: {after}  ({report['train_seconds'] / 60:.1f} min)")
    if args.model_out:
        enc.save_pretrained(args.model_out)
    write_result(
        "stsb" if not opts and not args.max_train_pairs else "stsb_custom",
        {
            "benchmark": "STS-B test Spearman x100, bundled all-MiniLM-L6-v2 before vs after CoSENT fine-tuning on STS-B train",
            "n_train": len(train),
            "n_dev": len(dev),
            "n_test": len(test),
            "test_before": before,
            "test_after": after,
            "fit_report": report,
            "model_out": args.model_out,
        },
    )
    return 0


# --------------------------------------------------------------------------- main


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)

    s = sub.add_parser("stsb", help="STS-B Spearman before/after CoSENT fine-tuning (defaults of fit)")
    s.add_argument("--data", default=str(DEFAULT_DATA))
    s.add_argument("--model-out", default="/tmp/nbce_bench/stsb_model")
    s.add_argument("--epochs", type=int, default=None, help="override the default (4) for a quick look")
    s.add_argument("--max-train-pairs", type=int, default=None)
    s.set_defaults(func=bench_stsb)

    for sp in sub.choices.values():
        sp.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 avoids oversubscription on a shared machine)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
