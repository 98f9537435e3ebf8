"""``nbce-rag train``: fine-tune the encoder with CoSENT and save it.

    nbce-rag train --train F [--dev F] --out DIR [--encoder E] [--epochs N] ...
    nbce-rag train --qrels F --corpus F --queries F [--dev-qrels F] --out DIR ...

Pair files: STS-B TSV, CSV with a ``text1,text2,score`` header, or JSONL with those keys
(0-5 scores are divided by 5). Retrieval data (BEIR layout): every (query, relevant passage)
pair plus hard negatives mined from an index of the corpus built with the starting encoder,
graded relevant > hard negative > random negative. Prints progress, then a report, and
writes ``DIR/training_report.json`` next to the model.
"""

from __future__ import annotations

import argparse
import sys

from nbce_rag.commands.arguments import examples


def register(subparsers: "argparse._SubParsersAction") -> None:
    from nbce_rag.retrieval.encoder import CoSENTTrainingConfig

    d, r = CoSENTTrainingConfig(), CoSENTTrainingConfig.retrieval()
    p = subparsers.add_parser(
        "train",
        help="fine-tune the encoder with CoSENT on scored pairs or retrieval qrels",
        description="Fine-tune the sentence encoder with sentence-transformers' CoSENTLoss "
        f"(scale {d.scale:g}). Defaults are measured recipes: for scored pairs (STS-B) {d.epochs} epochs, "
        f"batch {d.batch_size}, lr {d.learning_rate:g}, {d.warmup_ratio:.0%} warm-up; for --qrels (SciFact) "
        f"{r.epochs} epochs, lr {r.learning_rate:g}, a query's pairs in one batch.",
        epilog=examples(
            "nbce-rag train --train stsb_train.tsv --dev stsb_dev.tsv --out my_encoder",
            "nbce-rag train --qrels qrels/train.tsv --corpus corpus.jsonl --queries queries.jsonl "
            "--dev-qrels qrels/dev.tsv --out my_encoder",
            "nbce-rag index docs/ --out my_index --encoder my_encoder   # then use it",
        ),
    )
    src = p.add_argument_group("training data (pairs or qrels)")
    src.add_argument("--train", metavar="F", help="pairs: STS-B TSV, CSV or JSONL with text1,text2,score")
    src.add_argument("--dev", metavar="F", help="held-out pairs for Spearman before/after (same formats)")
    src.add_argument("--qrels", metavar="F",
                     help="retrieval training labels: BEIR TSV 'query-id corpus-id score' or TREC 'qid 0 docid rel'")
    src.add_argument("--corpus", metavar="F", help="BEIR corpus.jsonl (with --qrels)")
    src.add_argument("--queries", metavar="F", help="BEIR queries.jsonl or 'id<TAB>text' lines (with --qrels)")
    src.add_argument("--dev-qrels", metavar="F", help="held-out qrels, turned into graded dev pairs")
    src.add_argument("--hard-negatives", type=int, default=3, help="mined hard negatives per query (default 3)")
    src.add_argument("--random-negatives", type=int, default=1, help="random negatives per query (default 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the fine-tuned encoder")
    p.add_argument("--encoder", default=None, metavar="E", help="starting encoder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the training pairs (default {d.epochs}; {r.epochs} with --qrels)")
    p.add_argument("--batch-size", type=int, default=None, help=f"pairs per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {d.learning_rate:g}; {r.learning_rate:g} with --qrels)")
    p.add_argument("--warmup-ratio", type=float, default=None,
                   help=f"share of the steps with a rising learning rate (default {d.warmup_ratio})")
    p.add_argument("--group-batches", action=argparse.BooleanOptionalAction, default=None,
                   help="keep pairs that share their first text (a query) in one batch "
                   "(default: on with --qrels, off for pairs)")
    p.add_argument("--max-pairs", type=int, default=None, help="use only the first N training pairs")
    p.add_argument("--keep-best", action="store_true", help="restore the epoch with the best dev Spearman")
    p.add_argument("--seed", type=int, default=None, help=f"random seed of shuffling and sampling (default {d.seed})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import random
    from pathlib import Path

    from nbce_rag.data import qrels_to_pairs
    from nbce_rag.retrieval.readers import BeirData, read_beir_corpus, read_pairs, read_qrels, read_queries
    from nbce_rag.retrieval.encoder import CoSENTEncoder, CoSENTTrainingConfig
    from nbce_rag.errors import ConfigError

    if bool(args.train) == bool(args.qrels):
        raise ConfigError("give either --train F (scored pairs) or --qrels F --corpus F --queries F")
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
             "warmup_ratio": args.warmup_ratio, "group_batches": args.group_batches, "seed": args.seed}
    config = (CoSENTTrainingConfig.retrieval if args.qrels else CoSENTTrainingConfig)(
        **{k: v for k, v in given.items() if v is not None})
    config.validate()
    enc = CoSENTEncoder.from_pretrained(args.encoder)
    print(f"encoder: {enc.identity}", file=sys.stderr)
    dev = read_pairs(args.dev) if args.dev else None
    if args.train:
        train = read_pairs(args.train)
    else:
        if not (args.corpus and args.queries):
            raise ConfigError("--qrels needs --corpus and --queries")
        from nbce_rag.retrieval.index import VectorIndex

        corpus, queries = read_beir_corpus(args.corpus), read_queries(args.queries)
        data = BeirData(corpus, queries, read_qrels(args.qrels))
        print(f"mining hard negatives: indexing {len(corpus)} passages with {enc.name}", file=sys.stderr)
        index = VectorIndex.build(
            enc, [{"text": data.doc_text(d), "id": d} for d in sorted(corpus)], show_progress_bar=not args.no_progress
        )
        kw = dict(n_hard=args.hard_negatives, n_random=args.random_negatives, seed=config.seed)
        train = qrels_to_pairs(data, index, **kw)
        if args.dev_qrels:
            dev = qrels_to_pairs(BeirData(corpus, queries, read_qrels(args.dev_qrels)), index, **kw)
    if args.max_pairs:
        train = train[: args.max_pairs] if args.train else random.Random(config.seed).sample(train, min(args.max_pairs, len(train)))
    print(f"training pairs: {len(train)}" + (f", dev pairs: {len(dev)}" if dev else ""), file=sys.stderr)
    report = enc.fit(train, dev, config=config, keep_best=args.keep_best, show_progress_bar=not args.no_progress)
    out = Path(args.out)
    enc.save_pretrained(out)
    report["out"] = str(out)
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"trained on {report['n_pairs']} pairs: {report['steps']} steps in {report['train_seconds'] / 60:.1f} min")
    if "dev_before" in report:
        b, a = report["dev_before"], report["dev_after"]
        print(f"dev Spearman x100: {b['spearman']:.2f} -> {a['spearman']:.2f}   "
              f"Pearson x100: {b['pearson']:.2f} -> {a['pearson']:.2f}   ({a['n']} pairs)")
    print(f"saved {report['identity_after']} to {out}")
    return 0
