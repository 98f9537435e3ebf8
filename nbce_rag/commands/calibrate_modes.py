"""The label-free modes of ``nbce-rag calibrate`` (kept apart from the qrels mode in calibrate.py).

    nbce-rag calibrate --prior --data DIR [--datasets scifact squad nq hotpotqa] [--encoder E] [--out F]
    nbce-rag calibrate --synthetic --index DIR [--n 200] [--seed S] [--model M] [--filter-top 3]

``--prior`` runs the recipe of the shipped prior (:func:`nbce_rag.filtering.prior.build_prior`) for any
encoder; put the file written in ``$NBCE_RAG_PRIOR_PATH`` (or pass it to the pipeline) to use
it. ``--synthetic`` writes ``DIR/calibration.synthetic.json``
(:func:`nbce_rag.filtering.synthetic.synthetic_calibration`), which the pipeline uses when the index
has no labelled ``calibration.json``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of the prior / synthetic modes and the objective (shared by all modes)."""
    from nbce_rag.filtering.prior import DATASETS

    g = p.add_argument_group("calibration without labels")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--prior", action="store_true",
                      help="make a prior calibration for an encoder from public labelled data (--data)")
    mode.add_argument("--synthetic", action="store_true",
                      help="self-calibrate --index from questions the decoder's LM writes about its chunks")
    g.add_argument("--data", metavar="DIR", default=None,
                   help="--prior: the data folder (SciFact, SQuAD, NQ, HotpotQA; see its README)")
    g.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS),
                   help="--prior: data sets to pool (default: all four)")
    g.add_argument("--queries-per-dataset", type=int, default=300,
                   help="--prior: queries drawn per data set (default 300)")
    g.add_argument("--encoder", metavar="E", default=None,
                   help="--prior: encoder directory or id (default: the bundled one)")
    g.add_argument("--n", type=int, default=200, help="--synthetic: chunks to write a question about (default 200)")
    g.add_argument("--filter-top", type=int, default=3,
                   help="--synthetic: keep a question when its source chunk is in its top N hits (default 3)")
    g.add_argument("--model", metavar="M", default=None,
                   help="--synthetic: the LM that writes questions (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--device", default=None, help="--synthetic: cpu, cuda, mps or auto")
    p.add_argument("--objective", default=None, metavar="OBJ",
                   help="what the threshold and margin maximise: f1, f<beta> (e.g. f0.5) or "
                   "coverage<share> (e.g. coverage0.9: highest precision keeping a relevant passage for "
                   "that share of answerable queries). Default: the package default (see README)")


def wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "prior", False) or getattr(args, "synthetic", False))


def run(args: argparse.Namespace, margin: Any) -> int:
    """Run --prior or --synthetic (``margin`` already parsed by calibrate.py)."""
    import json

    from nbce_rag.errors import ConfigError
    from nbce_rag.filtering.threshold import plot_distributions

    kw = dict(precision_target=args.precision_target, recall_target=args.recall_target, margin=margin,
              n_bootstrap=args.bootstrap, seed=args.seed, objective=objective_arg(args))
    if args.prior:
        from nbce_rag.retrieval.encoder import CoSENTEncoder
        from nbce_rag.filtering.prior import build_prior

        if not args.data:
            raise ConfigError("--prior needs --data DIR: the folder with beir_scifact/, squad_v1.1/, "
                              "lost_in_the_middle/ and hotpotqa_distractor_dev100/")
        enc = CoSENTEncoder.from_pretrained(args.encoder)
        th = build_prior(enc, args.data, datasets=args.datasets, k=args.k,
                         queries_per_dataset=args.queries_per_dataset, show_progress=True, **kw)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", getattr(enc, "name", "encoder")).strip("-") or "encoder"
        written = th.save(Path(args.out) if args.out else Path(f"prior-{slug}.json"))
        title = f"prior for {enc.identity}: {'+'.join(args.datasets)} (top-{args.k})"
        hint = (f"use it: export NBCE_RAG_PRIOR_PATH={written.resolve()}  (an index without its own "
                "calibration then filters with it)")
    else:
        from nbce_rag.decoding.decoder import NBCEDecoder
        from nbce_rag.retrieval.index import VectorIndex
        from nbce_rag.filtering.prior import SYNTHETIC_FILENAME
        from nbce_rag.filtering.synthetic import synthetic_calibration

        if not args.index:
            raise ConfigError("--synthetic needs --index DIR")
        index = VectorIndex.load(args.index)
        dec = NBCEDecoder.from_pretrained(args.model, device=args.device)
        th = synthetic_calibration(index, dec, n=args.n, k=args.k, filter_top=args.filter_top,
                                   show_progress=True, n_option=getattr(args, "n_option", "--n"), **kw)
        written = th.save(Path(args.out) if args.out else Path(args.index) / SYNTHETIC_FILENAME)
        title = f"{Path(args.index).name}: synthetic questions (top-{args.k})"
        hint = ("the index now filters with it unless a labelled calibration.json is there "
                "(labelled > synthetic > prior)")
    plot_path = None
    if not args.no_plot:
        plot_path = Path(args.plot) if args.plot else written.with_suffix(".png")
        plot_distributions(th, plot_path, title=title)
    if args.json:
        print(json.dumps(th.to_dict(), indent=2))
        return 0
    print(th.report())
    print(f"objective:  {th.stats.get('objective')}")
    if args.prior:
        for name, d in th.stats["prior"]["per_dataset"].items():
            print(f"  {name:9s} {d['queries']} queries over {d['passages']} passages, "
                  f"{d['relevant_in_candidates']} relevant candidates")
    else:
        s = th.stats["synthetic"]
        print(f"questions:  {s['n_sampled']} chunks sampled, {s['n_questions']} questions written, "
              f"{s['n_kept']} kept (source chunk in the top {s['filter_top']}), seed {s['seed']}")
        for ex in s["examples"][:3]:
            print(f"  e.g. [{ex['chunk']}] {ex['question']}")
    print(f"wrote:      {written}" + (f" and {plot_path}" if plot_path else ""))
    print(hint, file=sys.stderr)
    return 0


def check_options(args: argparse.Namespace) -> None:
    """The options of the label-free modes, checked before anything loads (ConfigError)."""
    from nbce_rag.errors import ConfigError

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1 (chunks to write a question about), got {args.n}")
    if not 1 <= args.filter_top <= args.k:
        raise ConfigError(f"--filter-top must be in [1, --k] = [1, {args.k}], got {args.filter_top}")
    if args.queries_per_dataset < 1:
        raise ConfigError(f"--queries-per-dataset must be >= 1, got {args.queries_per_dataset}")


def objective_arg(args: argparse.Namespace) -> str:
    from nbce_rag.errors import CalibrationError, ConfigError
    from nbce_rag.filtering.objective import DEFAULT_OBJECTIVE, parse_objective

    obj = args.objective or DEFAULT_OBJECTIVE
    try:
        return parse_objective(obj).name
    except CalibrationError as e:
        raise ConfigError(f"--objective: {e}") from None
