"""The decode steps over a static KV cache, optionally under ``torch.compile`` (the GPU fast path).

After the prefill, the rows' dynamic caches (left-padded to one width ``W``) are copied into
one transformers ``StaticCache`` whose shapes are *bucketed*: rows rounded up to a multiple of
``ROW_BUCKET`` (extra rows are inert copies of row 0 whose logits are dropped), length
``W + max_new_tokens`` rounded up to a multiple of ``LENGTH_BUCKET``. Every decode step then
has the same tensor shapes and writes in place (the token ids, one attention-mask column,
the positions, the cache), which is what CUDA graphs need: ``torch.compile(mode=
"reduce-overhead")`` replays the whole step — the forward of every row, the reorder into row
order and the log-softmax — as one graph, recompiling only when a request falls into a new
bucket. The chosen token is the one value that goes to the host per step (the sampler,
detokenising and stop strings need it there).

Without compilation the same static path runs eagerly; in fp32 it gives the same tokens as
the dynamic-cache path (tests/test_static_decode.py). GPU speed is NOT measured in this
repository yet (no GPU was available when it was written): ``NBCEConfig.compile`` defaults to
``False``; ``"auto"`` turns it on only on CUDA, ``True`` everywhere.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional

import torch

logger = logging.getLogger(__name__)

#: decode rows are rounded up to a multiple of this (bounds recompiles over request sizes)
ROW_BUCKET = 8
#: the static cache length is rounded up to a multiple of this
LENGTH_BUCKET = 256

_COMPILED: dict = {}


def _round_up(x: int, m: int) -> int:
    return ((x + m - 1) // m) * m


def wants_compile(setting: Any, device: torch.device) -> bool:
    """``compile`` option -> whether to use the static/compiled path on ``device``."""
    if setting in (False, None, "off"):
        return False
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def supported(groups: List[Any]) -> bool:
    """Whether the prefilled groups can move into a static cache: one decode group (see
    ``NBCEConfig.decode_rows``) of plain full-attention layers."""
    from nbce_rag.decoding.kvlayout import is_plain

    return len(groups) == 1 and is_plain(groups[0].cache)


class StaticStepper:
    """``step(token) -> logits [rows, V]`` in row order, like ``NBCEDecoder._decode_step(groups,
    token)[inverse]``, over a bucketed ``StaticCache``. ``compile``: run the step under
    ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on a GPU)."""

    def __init__(self, dec: Any, group: Any, inverse: torch.Tensor, max_new_tokens: int, compile: bool = False):
        from transformers import StaticCache

        self.dec = dec
        model = dec.model
        n = len(group.rows)
        width = group.mask.shape[1]
        rows = _round_up(n, ROW_BUCKET)
        length = _round_up(width + max_new_tokens, LENGTH_BUCKET)
        dev = group.mask.device
        self.n, self.width, self.rows, self.length = n, width, rows, length
        pad = [0] * (rows - n)  # inert rows: copies of row 0 (finite attention), logits dropped
        take = torch.tensor(list(range(n)) + pad, device=dev)
        cache = StaticCache(config=model.config, max_cache_len=length)
        for src, dst in zip(group.cache.layers, cache.layers):
            k, v = src.keys.index_select(0, take), src.values.index_select(0, take)
            dst.lazy_initialization(k, v)
            dst.keys[:, :, :width].copy_(k)
            dst.values[:, :, :width].copy_(v)
            dst.cumulative_length.fill_(width)
        self.cache = cache
        self.mask = torch.zeros((rows, length), dtype=group.mask.dtype, device=dev)
        self.mask[:, :width] = group.mask.index_select(0, take)
        self.pos = group.last_pos.index_select(0, take).clone()
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.col = width  # the next cache column
        self.inverse = inverse
        self._fn: Callable = _step
        if compile:
            key = (id(model), rows, length)
            if key not in _COMPILED:
                _COMPILED[key] = torch.compile(_step, mode="reduce-overhead", dynamic=False)
            self._fn = _COMPILED[key]

    def __call__(self, token: int) -> torch.Tensor:
        if self.col >= self.length:
            raise RuntimeError(f"static cache of {self.length} positions is full")
        self.ids.fill_(int(token))
        self.mask[:, self.col] = 1
        self.pos.add_(1)
        self.col += 1
        dec = self.dec
        logits = self._fn(dec.model, dec._cache_kw, dec._logits_to_keep, self.ids, self.mask, self.pos, self.cache)
        return logits[: self.n][self.inverse]


def _step(model, cache_kw: str, logits_to_keep: bool, ids, mask, pos, cache) -> torch.Tensor:
    """One decode forward of every (bucketed) row: ``[rows, V]`` fp32 last-position logits."""
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True, cache_kw: cache}
    if logits_to_keep:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs).logits[:, -1, :].float()


def make_stepper(dec: Any, groups: List[Any], inverse: torch.Tensor, cfg: Any) -> Optional[StaticStepper]:
    """A :class:`StaticStepper` when ``cfg.compile`` asks for one on this device and the cache
    allows it; ``None`` (the dynamic path) otherwise, with a log line saying why."""
    if not wants_compile(getattr(cfg, "compile", False), dec.device):
        return None
    if not supported(groups):
        logger.info("compile: the rows' cache cannot be made static (several decode groups or a "
                    "non-standard cache); decoding eagerly")
        return None
    return StaticStepper(dec, groups[0], inverse, cfg.max_new_tokens, compile=getattr(cfg, "compile", False) != "static")
