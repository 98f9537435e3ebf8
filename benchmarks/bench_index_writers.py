"""Concurrent index writers, the fault from issue 12: N processes each load one index, add a
row and save at the same moment. Counts, over T trials, indexes left unloadable, writers that
failed, and rows lost from writers that reported success.

    python benchmarks/bench_index_writers.py --trials 10 --writers 2 --rows 20000 --dim 384 \\
        [--code DIR] [--out benchmarks/results/index_writers.json]

``--code`` runs the writers with another checkout's nbce_rag (e.g. an older commit, to see the
fault); the index itself is always written by this checkout (the format is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WRITER = """
import sys, time, numpy as np
from nbce_rag.retrieval.index import VectorIndex
path, name, go = sys.argv[1], sys.argv[2], float(sys.argv[3])
while time.time() < go:
    time.sleep(0.001)
try:
    idx = VectorIndex.load(path)
    idx.add_vectors(np.ones((1, idx.dim), np.float32), [name], [name])
    idx.save(path)
except Exception as e:
    print("FAIL", name, type(e).__name__, e, flush=True)
else:
    print("OK", name, flush=True)
"""

LOADER = "import sys; from nbce_rag.retrieval.index import VectorIndex as V; print(' '.join(V.load(sys.argv[1]).ids))"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--code", default=str(ROOT), help="checkout whose nbce_rag the writers run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from nbce_rag.retrieval.index import VectorIndex

    env = dict(os.environ, PYTHONPATH=args.code, OMP_NUM_THREADS="1")
    work = Path(tempfile.mkdtemp(prefix="bench_writers_"))
    template = work / "template"
    idx = VectorIndex(args.dim, "random@sha256:0123456789abcdef")
    idx.add_vectors(np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float32),
                    ["x" * 200] * args.rows, [f"b{i}" for i in range(args.rows)])
    idx.save(template)
    res = {"unloadable": 0, "writers_failed": 0, "rows_lost": 0, "clean_trials": 0}
    try:
        for t in range(args.trials):
            d = work / f"t{t}"
            shutil.copytree(template, d)
            go = time.time() + 2.0
            procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(d), f"w{w}", str(go)], env=env, cwd=work,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                     for w in range(args.writers)]
            lines = [line for p in procs for line in p.communicate()[0].splitlines()]
            ok = {line.split()[1] for line in lines if line.startswith("OK ")}
            failed = [line for line in lines if line.startswith("FAIL ")]
            r = subprocess.run([sys.executable, "-c", LOADER, str(d)], env=env, cwd=work, capture_output=True, text=True)
            lost = len(ok - set(r.stdout.split())) if r.returncode == 0 else len(ok)
            res["unloadable"] += r.returncode != 0
            res["writers_failed"] += len(failed)
            res["rows_lost"] += lost
            res["clean_trials"] += r.returncode == 0 and not failed and not lost
            shutil.rmtree(d)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = dict(vars(args), **res, load_average=os.getloadavg())
    print(json.dumps(out))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
