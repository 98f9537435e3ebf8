"""Constructor arguments of the framework adapters (LangChain, LlamaIndex), checked the same way:
an argument that is not a parameter is an error naming what to use instead, never dropped
(pydantic models ignore unknown fields by default); a ``device`` given the Hugging Face
pipeline way (an int) is understood; transformers generation keywords become NBCEConfig
options or an error. :func:`load_pipeline` is how an adapter built over a model name
loads it (on first use). No framework is imported here."""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any, Dict, Mapping, Optional

#: ``model_kwargs`` keys that have a parameter of their own
OWN_PARAMETERS = {"dtype": "dtype=", "torch_dtype": "dtype=", "device_map": "device_map=", "device": "device="}


def _config_fields() -> set:
    from nbce_rag.config import NBCEConfig

    return {f.name for f in fields(NBCEConfig)}


def check_constructor_arguments(cls_name: str, data: Mapping[str, Any], model_fields: Mapping[str, Any],
                                hints: Mapping[str, str]) -> None:
    """Raise ``TypeError`` for arguments in ``data`` that are not among ``model_fields`` (a
    pydantic ``model_fields`` mapping; aliases count), for ``nbce_options`` that are not
    :class:`NBCEConfig` fields, and for ``model_kwargs`` that have a parameter of their own.
    ``hints`` maps names used by other integrations to what to pass here instead."""
    known = set()
    for name, f in model_fields.items():
        known.add(name)
        for alias in (getattr(f, "alias", None), getattr(f, "validation_alias", None)):
            if isinstance(alias, str):
                known.add(alias)
            elif alias is not None and hasattr(alias, "choices"):  # AliasChoices
                known.update(c for c in alias.choices if isinstance(c, str))
    unknown = [k for k in data if k not in known]
    if unknown:
        config_fields = _config_fields()
        msgs = []
        for k in unknown:
            if k in hints:
                msgs.append(f"{k!r}: use {hints[k]}")
            elif k in config_fields:
                msgs.append(f"{k!r} is a decoding option: use nbce_options={{{k!r}: ...}} or pass it per call")
            else:
                near = difflib.get_close_matches(k, sorted(known | config_fields), n=1)
                msgs.append(f"{k!r} is not a parameter" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise TypeError(f"{cls_name}: unsupported argument(s): " + "; ".join(msgs)
                        + f". Parameters: {sorted(n for n in model_fields if not n.startswith('_'))}")
    generation_options(data.get("nbce_options"), f"{cls_name} nbce_options")
    bad = sorted(set(data.get("model_kwargs") or {}) & set(OWN_PARAMETERS))
    if bad:
        raise TypeError(f"{cls_name}: model_kwargs {bad} have parameters of their own: use "
                        + ", ".join(OWN_PARAMETERS[b] for b in bad))


def device_name(device: Any) -> Optional[str]:
    """``device`` as Hugging Face pipelines take it (an int: -1 = CPU, n = CUDA device n) or as
    torch names it (``"cpu"``, ``"cuda:1"``, ``"mps"``)."""
    if device is None or isinstance(device, str):
        return device
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu" if device < 0 else f"cuda:{device}"
    raise TypeError(f"device must be a str ('cpu', 'cuda:1', 'mps') or an int (-1 = CPU), got {device!r}")


def generation_options(kwargs: Optional[Mapping[str, Any]], where: str) -> Dict[str, Any]:
    """transformers-style generation keywords (``pipeline_kwargs``, ``generate_kwargs``,
    ``nbce_options``) as :class:`NBCEConfig` options; a keyword NBCE has no equivalent for is a
    ``TypeError`` listing the options there are."""
    names = _config_fields()
    out: Dict[str, Any] = {}
    for k, v in dict(kwargs or {}).items():
        if k == "max_length":
            raise TypeError(f"{where}: max_length is not supported; use max_new_tokens")
        if k not in names:
            raise TypeError(f"{where}: {k!r} has no NBCE equivalent; NBCEConfig options: {sorted(names)}")
        out[k] = v
    return out


def load_pipeline(model_name: Optional[str] = None, *, device: Optional[str] = None, dtype: Optional[str] = None,
                  device_map: Any = None, model_kwargs: Optional[Mapping[str, Any]] = None,
                  decoder: Any = None) -> Any:
    """A :class:`RAGPipeline` (no index, no filter) over ``decoder``, or over the model
    ``model_name`` (``None`` = the bundled one) loaded with :meth:`NBCEDecoder.from_pretrained`
    and the loading options ``device``, ``dtype``, ``device_map``, ``model_kwargs``."""
    from nbce_rag.decoding.decoder import NBCEDecoder
    from nbce_rag.pipeline import RAGPipeline

    if decoder is None:
        decoder = NBCEDecoder.from_pretrained(model_name, device=device, dtype=dtype, device_map=device_map,
                                              model_kwargs=model_kwargs)
    return RAGPipeline(decoder)
