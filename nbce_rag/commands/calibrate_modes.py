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
    from nbce_rag.filtering.decisions import DEFAULT_FLAG_TARGET, DEFAULT_KEEP_RECALL_TARGET, DEFAULT_SUPPORTED_TARGET

    d = p.add_argument_group("the two decisions: keep (which candidates become rows) and support (is the "
                             "question answerable)")
    d.add_argument("--keep-recall", type=float, default=DEFAULT_KEEP_RECALL_TARGET, metavar="R",
                   help="keep: the fewest rows that still keep this mean share of each answerable question's "
                   f"relevant candidates (macro keep-recall; default {DEFAULT_KEEP_RECALL_TARGET})")
    d.add_argument("--objective", default=None, metavar="OBJ",
                   help="keep: one rule maximising f1, f<beta> (e.g. f0.5) or coverage<share> (e.g. "
                   "coverage0.9) instead of --keep-recall (the calibration of nbce-rag before two decisions)")
    d.add_argument("--flag-target", type=float, default=DEFAULT_FLAG_TARGET, metavar="F",
                   help=f"support: share of off-topic questions flagged unsupported (default {DEFAULT_FLAG_TARGET})")
    d.add_argument("--supported-target", type=float, default=DEFAULT_SUPPORTED_TARGET, metavar="S",
                   help="support: share of in-domain questions kept supported when there are no off-topic "
                   f"questions to calibrate on (default {DEFAULT_SUPPORTED_TARGET})")
    d.add_argument("--off-topic", metavar="F", default=None,
                   help="support: questions this index should not answer (queries.jsonl or 'id<TAB>text' "
                   "lines), searched like the others; their best scores calibrate the support rule")


def wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "prior", False) or getattr(args, "synthetic", False))


def run(args: argparse.Namespace, margin: Any) -> int:
    """Run --prior or --synthetic (``margin`` already parsed by calibrate.py)."""
    import json

    from nbce_rag.errors import ConfigError

    kw = decision_kwargs(args)
    kw.update(precision_target=args.precision_target, recall_target=args.recall_target, margin=margin,
              n_bootstrap=args.bootstrap, seed=args.seed)
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
        if args.off_topic:
            kw["off_topic_max"] = off_topic_scores(index, args.off_topic, args.k)
        th = synthetic_calibration(index, dec, n=args.n, k=args.k, filter_top=args.filter_top,
                                   show_progress=True, **kw)
        written = th.save(Path(args.out) if args.out else Path(args.index) / SYNTHETIC_FILENAME)
        title = f"{Path(args.index).name}: synthetic questions (top-{args.k})"
        hint = ("the index now filters with it unless a labelled calibration.json is there "
                "(labelled > synthetic > prior)")
    plot_path = write_plot(args, th, written, title)
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
        if s.get("note"):
            print(f"note:       {s['note']}")
    print(f"wrote:      {written}" + (f" and {plot_path}" if plot_path else ""))
    print(hint, file=sys.stderr)
    return 0


def objective_arg(args: argparse.Namespace) -> Any:
    """``--objective`` parsed (``None`` when not given: the keep rule is recall first)."""
    from nbce_rag.errors import CalibrationError, ConfigError
    from nbce_rag.filtering.objective import parse_objective

    if not args.objective:
        return None
    try:
        return parse_objective(args.objective).name
    except CalibrationError as e:
        raise ConfigError(f"--objective: {e}") from None


def decision_kwargs(args: argparse.Namespace) -> dict:
    """The keep and support options as :meth:`MarginThreshold.calibrate` keywords (checked)."""
    from nbce_rag.errors import ConfigError

    for name in ("keep_recall", "flag_target", "supported_target"):
        v = getattr(args, name)
        if not 0 < v <= 1:  # also rejects nan
            raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
    obj = objective_arg(args)
    return dict(objective=obj, keep_recall_target=None if obj else args.keep_recall, flag_target=args.flag_target,
                supported_target=args.supported_target)


def off_topic_scores(index: Any, path: str, k: int) -> list:
    """Best-candidate scores of the off-topic questions in ``path`` (``--off-topic``)."""
    from nbce_rag.retrieval.readers import load_queries

    texts = list(load_queries(path).values())
    return [max((float(h.score) for h in hs), default=float("nan")) for hs in index.search_many(texts, k=k)
            if hs]


def write_plot(args: argparse.Namespace, th: Any, written: Path, title: str) -> Any:
    """The PNG of the calibration (``--plot`` / next to it), or ``None`` with a note when
    ``--no-plot`` or matplotlib is not installed (the plot is optional)."""
    from nbce_rag.filtering.plot import can_plot, plot_distributions

    if args.no_plot:
        return None
    if not can_plot():
        print("note:       no plot written: matplotlib is not installed (pip install matplotlib; --no-plot "
              "silences this note)", file=sys.stderr)
        return None
    plot_path = Path(args.plot) if args.plot else written.with_suffix(".png")
    return plot_distributions(th, plot_path, title=title)
