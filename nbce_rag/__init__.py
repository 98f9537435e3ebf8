"""nbce-rag: answer from many retrieved passages without concatenating them.

CoSENT retrieval -> margin-calibrated filter -> NBCE (Naive Bayes-based Context Extension)
decoding. Public names are imported lazily so that ``import nbce_rag`` stays fast and a
missing optional piece never breaks the others.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "NBCEDecoder": "nbce_rag.decoder",
    "NBCEConfig": "nbce_rag.config",
    "DecodeState": "nbce_rag.decoder",
    "StepScheduler": "nbce_rag.scheduler",
    "SchedulerConfig": "nbce_rag.scheduler",
    "CoSENTEncoder": "nbce_rag.encoder",
    "CoSENTTrainingConfig": "nbce_rag.training",
    "VectorIndex": "nbce_rag.index",
    "MarginThreshold": "nbce_rag.threshold",
    "FilterResult": "nbce_rag.types",
    "RAGPipeline": "nbce_rag.pipeline",
    "Passage": "nbce_rag.types",
    "Hit": "nbce_rag.types",
    "Answer": "nbce_rag.types",
    "SourceInfo": "nbce_rag.types",
    "StreamEvent": "nbce_rag.types",
    "load_model": "nbce_rag.models",
    "NBCERagError": "nbce_rag.errors",
    "ModelLoadError": "nbce_rag.errors",
    "PromptTooLongError": "nbce_rag.errors",
    "EncoderMismatchError": "nbce_rag.errors",
    "CorruptFileError": "nbce_rag.errors",
    "CalibrationError": "nbce_rag.errors",
    "ConfigError": "nbce_rag.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'nbce_rag' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return __all__
