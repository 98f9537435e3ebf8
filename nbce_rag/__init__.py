"""nbce-rag: answer from many retrieved passages without concatenating them.

CoSENT retrieval -> margin-calibrated filter -> NBCE (Naive Bayes-based Context Extension)
decoding. Public names are imported lazily so that ``import nbce_rag`` stays fast and a
missing optional piece never breaks the others.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "NBCEDecoder": "nbce_rag.decoding.decoder",
    "NBCEConfig": "nbce_rag.config",
    "DecodeState": "nbce_rag.decoding.decoder",
    "StepScheduler": "nbce_rag.decoding.scheduler",
    "SchedulerConfig": "nbce_rag.decoding.scheduler",
    "CoSENTEncoder": "nbce_rag.retrieval.encoder",
    "CoSENTTrainingConfig": "nbce_rag.retrieval.training",
    "VectorIndex": "nbce_rag.retrieval.index",
    "MarginThreshold": "nbce_rag.filtering.threshold",
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


# Modules that moved into the rooms ``retrieval/``, ``filtering/`` and ``decoding/`` (0.2): the old
# import paths keep working, as the same module objects, with a DeprecationWarning.
_MOVED = {
    "nbce_rag.encoder": "nbce_rag.retrieval.encoder",
    "nbce_rag.training": "nbce_rag.retrieval.training",
    "nbce_rag.index": "nbce_rag.retrieval.index",
    "nbce_rag.chunking": "nbce_rag.retrieval.chunking",
    "nbce_rag.readers": "nbce_rag.retrieval.readers",
    "nbce_rag.calibration": "nbce_rag.filtering.calibration",
    "nbce_rag.objective": "nbce_rag.filtering.objective",
    "nbce_rag.threshold": "nbce_rag.filtering.threshold",
    "nbce_rag.prior": "nbce_rag.filtering.prior",
    "nbce_rag.synthetic": "nbce_rag.filtering.synthetic",
    "nbce_rag.nbce": "nbce_rag.decoding.nbce",
    "nbce_rag.decoder": "nbce_rag.decoding.decoder",
    "nbce_rag.kvlayout": "nbce_rag.decoding.kvlayout",
    "nbce_rag.kvcache": "nbce_rag.decoding.kvcache",
    "nbce_rag.scheduler": "nbce_rag.decoding.scheduler",
    "nbce_rag.sampling": "nbce_rag.decoding.sampling",
    "nbce_rag.static_decode": "nbce_rag.decoding.static_decode",
    "nbce_rag.scoring": "nbce_rag.decoding.scoring",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import nbce_rag.decoder`` gives ``nbce_rag.decoding.decoder`` itself (one module object,
    so monkeypatching either name patches both)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = _MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there (the old path will be removed)",
            DeprecationWarning,
            stacklevel=3,
        )
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the alias's
        return module

    def exec_module(self, module) -> None:
        real = getattr(module.__spec__, "loader_state", None)
        if real is not None:
            module.__spec__ = real


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
