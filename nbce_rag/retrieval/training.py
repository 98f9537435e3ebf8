"""CoSENT fine-tuning: the training loop, its batching, and training pairs from qrels.

:meth:`CoSENTEncoder.fit <nbce_rag.retrieval.encoder.CoSENTEncoder.fit>` delegates to :func:`fit`.

Training uses sentence-transformers' own :class:`~sentence_transformers.losses.CoSENTLoss`
(Su 2022; Huang et al., TASLP 2024)::

    L = log(1 + sum_{s(i,j) > s(k,l)} exp(scale * (cos(u_k, u_l) - cos(u_i, u_j))))

over all pairs of pairs in a batch whose gold scores are ordered; ``scale`` = 20. The loop
around it is the one ``SentenceTransformerTrainer`` runs by default (AdamW, weight decay 0,
linear warm-up then linear decay, gradient clipping at 1.0, shuffled batches), written out
here so that training needs neither ``datasets`` nor ``accelerate``'s trainer machinery.

Defaults (:class:`CoSENTTrainingConfig`) are the ones measured to work on STS-B with the
bundled encoder: 4 epochs, batch 16, lr 2e-5, 10% warm-up (86.6 test Spearman from 82.0;
1 epoch at batch 32 made it *worse*, 81.2). See ``benchmarks/RESULTS_retriever.md``.

Retrieval qrels become graded pairs with :func:`qrels_to_pairs` (hard negatives mined from an
index); :meth:`CoSENTTrainingConfig.retrieval` is the recipe measured for them.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from nbce_rag.errors import ConfigError
from nbce_rag.retrieval.readers import BeirData, Pair
from nbce_rag.types import document_id

logger = logging.getLogger(__name__)

__all__ = ["CoSENTTrainingConfig", "fit", "qrels_to_pairs"]


@dataclass
class CoSENTTrainingConfig:
    """Options of :meth:`CoSENTEncoder.fit`. Defaults are the measured STS-B recipe;
    :meth:`retrieval` gives the one measured for query-passage pairs from qrels."""

    epochs: int = 4  #: passes over the training pairs
    batch_size: int = 16  #: pairs per step (CoSENT compares all pairs inside a batch)
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1  #: share of steps with linear warm-up, then linear decay to 0
    weight_decay: float = 0.0  #: AdamW decay (not applied to biases and LayerNorm weights)
    max_grad_norm: float = 1.0  #: gradient clipping; 0 disables
    scale: float = 20.0  #: CoSENT lambda (inverse temperature)
    seed: int = 42
    max_steps: Optional[int] = None  #: stop after this many steps (overrides epochs)
    max_length: Optional[int] = None  #: truncate training inputs to this many tokens (None: max_seq_length)
    eval_each_epoch: bool = True  #: evaluate on ``dev`` after every epoch (report history)
    keep_best: bool = False  #: restore the epoch with the best dev Spearman at the end
    score_scale: Union[str, float, None] = "auto"  #: "auto": 0-5 scores divided by 5
    show_progress_bar: bool = True
    eval_batch_size: int = 64
    #: keep pairs that share their first text (a query with its relevant and negative
    #: passages) in one batch, so CoSENT ranks a query's own passages against each other and
    #: not only against other queries' pairs; whole groups are shuffled and packed into
    #: batches of at most ``batch_size`` pairs (a larger group is split). For retrieval pairs.
    group_batches: bool = False

    @classmethod
    def retrieval(cls, **overrides: Any) -> "CoSENTTrainingConfig":
        """The measured recipe for retrieval pairs mined from qrels (:func:`~nbce_rag.data.qrels_to_pairs`):
        3 epochs at lr 5e-5, a query's pairs in one batch, inputs at the encoder's full length.
        Chosen on held-out SciFact train queries; on the test qrels it took the bundled
        all-MiniLM-L6-v2 from 64.5 to 78.8-79.7 nDCG@10, nearly all of it on queries whose
        relevant abstracts were train positives (+1.0 on the others; benchmarks/RESULTS_retriever.md)."""
        return replace(cls(epochs=3, learning_rate=5e-5, group_batches=True), **overrides)

    def validate(self) -> None:
        if self.epochs < 1 and not self.max_steps:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 (CoSENT compares pairs within a batch), got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.scale > 0:
            raise ConfigError(f"scale must be > 0, got {self.scale}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_length is not None and self.max_length < 4:
            raise ConfigError(f"max_length must be >= 4 tokens, got {self.max_length}")


def fit(
    encoder: Any,
    pairs: Iterable[Any],
    dev: Optional[Iterable[Any]] = None,
    *,
    config: Optional[CoSENTTrainingConfig] = None,
    **options: Any,
) -> Dict[str, Any]:
    """Fine-tune with ``sentence_transformers.losses.CoSENTLoss`` (scale 20) in place (``encoder``: a :class:`~nbce_rag.retrieval.encoder.CoSENTEncoder`).

    ``pairs``/``dev``: ``(text1, text2, score)`` tuples, dicts, or ``InputExample``. Only the
    order of the scores matters to CoSENT; 0-5 scores are divided by 5 (``score_scale``).
    ``options`` override fields of :class:`CoSENTTrainingConfig` (``epochs``,
    ``batch_size``, ``learning_rate``, ``warmup_ratio``, ...).

    Returns a report: options used, number of pairs and steps, ``train_seconds`` (the
    optimisation loop, without the per-epoch dev evaluations: ``eval_seconds``), the mean
    loss per epoch and, with ``dev``, ``dev_before``/``dev_after`` (see :meth:`evaluate`)
    and the per-epoch dev Spearman.
    """
    import numpy as np
    import torch
    from sentence_transformers.losses import CoSENTLoss
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from nbce_rag.retrieval.readers import as_pairs, scale_pairs

    cfg = config or CoSENTTrainingConfig()
    known = {f.name for f in fields(CoSENTTrainingConfig)}
    aliases = {"lr": "learning_rate", "warmup": "warmup_ratio"}
    options = {aliases.get(k, k): v for k, v in options.items()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown fit() option(s) {unknown}; known: {sorted(known)}")
    cfg = replace(cfg, **options)
    cfg.validate()

    train = scale_pairs(as_pairs(pairs), cfg.score_scale, Path("<train pairs>"))
    dev_pairs = scale_pairs(as_pairs(dev), cfg.score_scale, Path("<dev pairs>")) if dev is not None else None
    if len(train) < 2:
        raise ConfigError("fit() needs at least 2 training pairs")
    if len({p[2] for p in train}) < 2:
        raise ConfigError("all training scores are equal: CoSENT learns from their order and needs at least two levels")

    model = encoder.model
    device = model.device
    report: Dict[str, Any] = {
        "loss": f"sentence_transformers.losses.CoSENTLoss(scale={cfg.scale})",
        "config": asdict(cfg),
        "n_pairs": len(train),
        "identity_before": encoder.identity,
    }
    if dev_pairs is not None:
        report["dev_before"] = encoder.evaluate(dev_pairs, batch_size=cfg.eval_batch_size)
        logger.info("dev before training: %s", report["dev_before"])

    loss_fn = CoSENTLoss(model, scale=cfg.scale)
    pre_kw = {"max_length": cfg.max_length} if cfg.max_length else {}
    rng = random.Random(cfg.seed)
    # every epoch's batches are drawn up front: with group_batches their number depends on
    # the packing, and the learning-rate schedule needs the total
    first = _epoch_batches(train, cfg.batch_size, cfg.group_batches, rng)
    steps_per_epoch = len(first)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    plan = [first] + [_epoch_batches(train, cfg.batch_size, cfg.group_batches, rng) for _ in range(epochs - 1)]
    total = min(total, sum(len(b) for b in plan))
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n or n.endswith(".bias")) else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
    )
    warmup_steps = math.ceil(total * cfg.warmup_ratio)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total)
    torch.manual_seed(cfg.seed)

    history: List[Dict[str, Any]] = []
    last_eval: Optional[Dict[str, float]] = None
    best_state, best_score = None, -math.inf
    step = 0
    eval_seconds = 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="CoSENT fine-tuning", unit="step", disable=not cfg.show_progress_bar)
    try:
        for epoch in range(epochs):
            model.train()
            losses: List[float] = []
            for idx in plan[epoch]:
                if step >= total:
                    break
                batch = [train[i] for i in idx]
                features = [
                    _to_device(model.preprocess([p[0] for p in batch], **pre_kw), device),
                    _to_device(model.preprocess([p[1] for p in batch], **pre_kw), device),
                ]
                labels = torch.tensor([p[2] for p in batch], dtype=torch.float32, device=device)
                loss = loss_fn(features, labels)
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                if step == 0:
                    encoder.weights_version += 1
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{np.mean(losses[-50:]):.3f}")
            model.eval()
            encoder._identity = None
            entry: Dict[str, Any] = {"epoch": epoch + 1, "steps": step, "mean_loss": float(np.mean(losses)) if losses else None}
            if dev_pairs is not None and (cfg.eval_each_epoch or cfg.keep_best or epoch == epochs - 1):
                te = time.perf_counter()
                ev = last_eval = encoder.evaluate(dev_pairs, batch_size=cfg.eval_batch_size)
                eval_seconds += time.perf_counter() - te
                entry["dev_spearman"] = ev["spearman"]
                if cfg.keep_best and ev["spearman"] > best_score:
                    best_score = ev["spearman"]
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                msg = f"epoch {epoch + 1}/{epochs}: mean loss {entry['mean_loss']:.4f}, dev Spearman {ev['spearman']:.2f}"
                if cfg.show_progress_bar:
                    bar.write(msg)
                else:
                    logger.info(msg)
            history.append(entry)
    finally:
        bar.close()
        model.eval()
        encoder._identity = None
    train_seconds = time.perf_counter() - t0 - eval_seconds
    if best_state is not None:
        model.load_state_dict(best_state)
        encoder.weights_version += 1
        encoder._identity = None
        report["restored_best_epoch"] = max(
            (h for h in history if "dev_spearman" in h), key=lambda h: h["dev_spearman"]
        )["epoch"]
    encoder.source = None
    if not encoder.name.endswith("+cosent"):
        encoder.name = f"{encoder.name}+cosent"
    encoder._identity = None
    report.update(
        steps=step, epochs_run=len(history), train_seconds=train_seconds, eval_seconds=eval_seconds, history=history
    )
    if dev_pairs is not None:
        if best_state is None and last_eval is not None and history and "dev_spearman" in history[-1]:
            report["dev_after"] = last_eval
        else:
            report["dev_after"] = encoder.evaluate(dev_pairs, batch_size=cfg.eval_batch_size)
    report["identity_after"] = encoder.identity
    return report


def _epoch_batches(train: List[Any], batch_size: int, grouped: bool, rng: random.Random) -> List[List[int]]:
    """One epoch's batches as lists of indices into ``train``: a plain shuffle cut into
    ``batch_size`` slices, or (``grouped``) pairs that share their first text kept together,
    the groups shuffled and packed greedily, a group larger than a batch split."""
    if not grouped:
        order = list(range(len(train)))
        rng.shuffle(order)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    groups: Dict[str, List[int]] = {}
    for i, p in enumerate(train):
        groups.setdefault(p[0], []).append(i)
    members = list(groups.values())
    rng.shuffle(members)
    batches: List[List[int]] = []
    cur: List[int] = []
    for g in members:
        if cur and len(cur) + len(g) > batch_size:
            batches.append(cur)
            cur = []
        while len(g) > batch_size:
            batches.append(g[:batch_size])
            g = g[batch_size:]
        cur = cur + g
    if cur:
        batches.append(cur)
    return batches


def _to_device(features: Dict[str, Any], device: Any) -> Dict[str, Any]:
    import torch

    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}


def qrels_to_pairs(
    data: BeirData,
    index: Any,
    *,
    n_hard: int = 3,
    n_random: int = 1,
    hard_score: float = 0.3,
    random_score: float = 0.0,
    top_k: int = 30,
    skip_top: int = 0,
    false_negative_ratio: float = 0.95,
    seed: int = 42,
    show_progress_bar: Optional[bool] = None,
) -> List[Pair]:
    """Turn retrieval qrels into graded CoSENT pairs, mining hard negatives from ``index``.

    For each judged query: every relevant passage gives ``(query, passage, grade/max_grade)``
    (1.0 for binary qrels); the ``n_hard`` best-ranked *non-relevant* passages that ``index``
    (a :class:`~nbce_rag.retrieval.index.VectorIndex` over the corpus, ids = corpus ids, possibly
    chunked as ``"<doc_id>#<n>"``) returns in its top ``top_k`` give ``(query, passage,
    hard_score)``; ``n_random`` random corpus passages give ``(query, passage, random_score)``.

    The grades make an order, relevant > hard negative > random negative, which is what CoSENT
    learns from: a batch that mixed only two levels would teach less, and putting hard
    negatives *above* random ones keeps the model from pushing topically close passages as far
    away as unrelated ones. A mined candidate scoring at least ``false_negative_ratio`` times
    the query's best relevant passage is skipped as a probable unlabelled positive (the
    "TopK-PercPos" filter of NV-Retriever). ``skip_top`` > 0 passes over the first
    ``skip_top`` non-relevant candidates and mines below them (deeper, fewer unlabelled
    positives); the search then reaches at least ``skip_top + 3 * n_hard`` results.
    """
    import numpy as np

    if hard_score <= random_score:
        raise ConfigError("hard_score must be above random_score so that CoSENT sees an order")
    if skip_top < 0 or n_hard < 0 or n_random < 0:
        raise ConfigError("n_hard, n_random and skip_top must be >= 0")
    top_k = max(top_k, skip_top + 3 * n_hard)
    rng = random.Random(seed)
    doc_ids = sorted(data.corpus)
    qids = [q for q in data.qrels if q in data.queries]
    if not qids:
        raise ConfigError("no judged query of the qrels is in the queries file")
    missing = sum(1 for q in data.qrels if q not in data.queries)
    if missing:
        logger.warning("%d judged queries are not in the queries file; skipped", missing)
    q_texts = [data.queries[q] for q in qids]
    # candidates only matter for hard negatives: without them, no query is searched
    hits_all = index.search_many(q_texts, k=top_k, show_progress_bar=show_progress_bar) if n_hard else [[]] * len(qids)
    q_vecs = None
    pairs: List[Pair] = []
    for qi, (qid, hits) in enumerate(zip(qids, hits_all)):
        rel = {d: g for d, g in data.qrels[qid].items() if g > 0 and d in data.corpus}
        if not rel:
            continue
        top = max(rel.values())
        qtext = data.queries[qid]
        for d, g in sorted(rel.items()):
            pairs.append((qtext, data.doc_text(d), g / top))
        # best cosine of a relevant passage, to spot unlabelled positives among candidates
        best_rel = max((h.score for h in hits if document_id(h) in rel), default=None)
        if best_rel is None and n_hard:
            if q_vecs is None:
                enc = index.encoder
                q_vecs = enc.encode(q_texts, show_progress_bar=False)
            rel_vecs = index.encoder.encode([data.doc_text(d) for d in rel], show_progress_bar=False)
            best_rel = float(np.max(rel_vecs @ q_vecs[qi]))
        seen = set(rel)
        n = skipped = 0
        for h in hits:
            d = document_id(h)
            if d in seen or d not in data.corpus:
                continue
            seen.add(d)
            if skipped < skip_top:
                skipped += 1
                continue
            if h.score >= false_negative_ratio * best_rel:
                continue
            pairs.append((qtext, data.doc_text(d), hard_score))
            n += 1
            if n >= n_hard:
                break
        for _ in range(n_random):
            for _try in range(20):
                d = rng.choice(doc_ids)
                if d not in seen:
                    seen.add(d)
                    pairs.append((qtext, data.doc_text(d), random_score))
                    break
    return pairs
