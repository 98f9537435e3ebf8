"""``nbce-rag calibrate``: calibrate the margin filter of an index from labelled queries.

    nbce-rag calibrate --index DIR --queries queries.jsonl --qrels qrels.tsv [--out F] [--plot F]
    nbce-rag calibrate --synthetic --index DIR [--n 200]      (no labels: calibrate_modes.py)
    nbce-rag calibrate --prior --data DIR [--encoder E]        (a prior for an encoder)

Searches the index for every labelled query (top ``--k``), calibrates
:class:`~nbce_rag.filtering.threshold.MarginThreshold` on those candidates, prints a report (threshold,
band, margin, precision/recall/F1 with bootstrap intervals), writes the calibration (default:
``DIR/calibration.json``, where the pipeline picks it up) and a PNG of the relevant and
irrelevant score distributions with the thresholds drawn (default: next to the calibration).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nbce_rag.commands import calibrate_modes
from nbce_rag.commands.arguments import examples, nonnegative_int, positive_int


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="calibrate the passage filter of an index from labelled queries (qrels)",
        description="Calibrate the margin-calibrated passage filter (best-F1 threshold, "
        "precision/recall band, within-query margin, bootstrap intervals) on an index's own "
        "top-k candidates of labelled queries. Options are checked before the index loads.",
        epilog=examples(
            "nbce-rag calibrate --index my_index --queries queries.jsonl --qrels qrels/dev.tsv",
            "nbce-rag calibrate --index my_index --queries queries.tsv --qrels qrels.trec --margin none --no-plot",
            "nbce-rag calibrate --index my_index --queries q.jsonl --qrels dev.tsv --out other.json --json",
        ),
    )
    p.add_argument("--index", metavar="DIR", help="index directory (nbce-rag index)")
    p.add_argument("--queries", metavar="F",
                   help="queries: BEIR queries.jsonl (_id, text) or 'id<TAB>text' lines")
    p.add_argument("--qrels", metavar="F",
                   help="relevance labels: BEIR TSV 'query-id corpus-id score' or TREC 'qid 0 docid rel'")
    p.add_argument("--out", metavar="F", default=None,
                   help="calibration file to write (default: DIR/calibration.json)")
    p.add_argument("--plot", metavar="F", default=None,
                   help="PNG of the score distributions (default: the --out path with .png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("-k", "--k", type=positive_int, default=20, help="candidates per query (default 20)")
    p.add_argument("--precision-target", type=float, default=0.9,
                   help="precision above the band's upper edge (default 0.9)")
    p.add_argument("--recall-target", type=float, default=0.9,
                   help="recall above the band's lower edge (default 0.9)")
    p.add_argument("--margin", default="auto", metavar="auto|none|M",
                   help="relative margin to the best candidate: 'auto' (default: chosen by F1 among 0 "
                   "and quantiles of the within-query spread of relevant scores), 'none', or a number")
    p.add_argument("--bootstrap", type=nonnegative_int, default=1000, help="bootstrap resamples over queries (default 1000)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the bootstrap resampling (default 0)")
    p.add_argument("--json", action="store_true", help="print the calibration as JSON instead of the report")
    calibrate_modes.add_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from nbce_rag.errors import ConfigError
    from nbce_rag.retrieval.index import VectorIndex
    from nbce_rag.filtering.threshold import MarginThreshold

    margin = _margin_arg(args.margin)  # validate before loading anything
    for name in ("precision_target", "recall_target"):
        if not 0 < getattr(args, name) <= 1:  # also rejects nan
            raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")
    decisions = calibrate_modes.decision_kwargs(args)
    if calibrate_modes.wanted(args):
        return calibrate_modes.run(args, margin)
    if not (args.index and args.queries and args.qrels):
        from nbce_rag.errors import ConfigError

        raise ConfigError("give --index DIR --queries F --qrels F (labelled queries), or calibrate without "
                          "labels: --synthetic --index DIR, or --prior --data DIR")
    index = VectorIndex.load(args.index)
    th = MarginThreshold.calibrate_from_qrels(
        index,
        args.queries,
        args.qrels,
        k=args.k,
        precision_target=args.precision_target,
        recall_target=args.recall_target,
        margin=margin,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        show_progress=True,
        off_topic=args.off_topic,
        **decisions,
    )
    out = Path(args.out) if args.out else Path(args.index)
    written = th.save(out)
    plot_path = calibrate_modes.write_plot(args, th, written, f"{Path(args.index).name}: relevant vs "
                                           f"irrelevant cosine scores (top-{args.k})")
    if args.json:
        print(json.dumps(th.to_dict(), indent=2))
    else:
        print(th.report())
        print(f"wrote:      {written}" + (f" and {plot_path}" if plot_path else ""))
    return 0


def main_synthetic(index_dir, n: int = 200, model=None) -> int:
    """``nbce-rag calibrate --synthetic --index DIR --n N`` with the other options at their defaults
    (what ``nbce-rag index ... --calibrate`` runs)."""
    p = argparse.ArgumentParser(prog="nbce-rag calibrate")
    register(p.add_subparsers())
    args = p.parse_args(["calibrate", "--synthetic", "--index", str(index_dir), "--n", str(n)]
                        + (["--model", str(model)] if model else []))
    return run(args)


def _margin_arg(v: str):
    from nbce_rag.errors import ConfigError

    if v == "auto":
        return "auto"
    if v.lower() == "none":
        return None
    try:
        m = float(v)
    except ValueError:
        raise ConfigError(f"--margin must be 'auto', 'none' or a number >= 0, got {v!r}") from None
    if not 0 <= m < float("inf"):  # also rejects nan and inf
        raise ConfigError(f"--margin must be a finite number >= 0, got {v}")
    return m
