"""The KV cache of a group of rows: left-padded, appended to in place, merged and cut.

A decode group's cache is transformers' ``DynamicCache`` whose layers hold ``[rows, heads,
width, head_dim]`` keys and values, rows left-padded to a common width (the attention mask
hides the padding). Two costs of the stock layout showed in a profile of the server's step
scheduler (16 requests, ``RAGPipeline.batch``, bundled model, CPU): ``DynamicLayer.update``
concatenates every new token onto the whole cache (``torch.cat``: a full copy of the cache at
every decode step, 15% of the run), and ``DynamicCache(data)`` copies its data once more when it
is built (the merges and compactions of the scheduler's lanes paid twice).

:class:`GrowingLayer` keeps keys and values as views of buffers with spare columns on the
right: a decode step writes its column in place, and a buffer is reallocated (with 12% + 16
spare columns) only when full, so appending costs O(1) amortised. Spare columns are never
zeroed or touched before they are written (on a CPU, first-touching fresh pages is most of what a
big allocation costs; see :mod:`nbce_rag.runtime`). :func:`cache_from` wraps
tensors without copying them. Anything that replaces a layer's ``keys``/``values`` (the
passage KV cache, compaction) simply makes the next append start a new buffer.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

try:  # transformers >= 4.56: caches made of layers
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older transformers: the stock layout only
    DynamicLayer = None  # type: ignore[assignment,misc]

#: spare columns of a new buffer: SPARE_MIN + width // SPARE_DIV
SPARE_MIN = 16
SPARE_DIV = 8


def _spare(width: int) -> int:
    return SPARE_MIN + width // SPARE_DIV


if DynamicLayer is not None:

    class GrowingLayer(DynamicLayer):  # type: ignore[misc,valid-type]
        """A ``DynamicLayer`` whose keys/values are views of larger buffers: appending writes in
        place instead of ``torch.cat`` over the whole cache (see the module docstring)."""

        def __init__(self, keys: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None) -> None:
            super().__init__()
            self._kbuf: Optional[torch.Tensor] = None
            self._vbuf: Optional[torch.Tensor] = None
            if keys is not None and values is not None:
                self.dtype, self.device = keys.dtype, keys.device
                self.keys, self.values = keys, values
                self.is_initialized = True

        def _owns(self) -> bool:
            """Whether ``keys``/``values`` are still the views this layer made (nobody replaced them)."""
            k, b = self.keys, self._kbuf
            return (b is not None and k is not None and k.data_ptr() == b.data_ptr() and k.shape[:2] == b.shape[:2]
                    and k.stride() == b.stride() and self.values.data_ptr() == self._vbuf.data_ptr())

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                self.dtype, self.device = key_states.dtype, key_states.device
                self.is_initialized = True
                width = 0
            else:
                width = self.keys.shape[-2]
            add = key_states.shape[-2]
            if not (width and self._owns() and width + add <= self._kbuf.shape[-2]):
                cap = width + add + _spare(width + add)
                kb = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
                vb = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
                if width:
                    kb[:, :, :width] = self.keys
                    vb[:, :, :width] = self.values
                self._kbuf, self._vbuf = kb, vb
            self._kbuf[:, :, width:width + add] = key_states
            self._vbuf[:, :, width:width + add] = value_states
            self.keys = self._kbuf[:, :, :width + add]
            self.values = self._vbuf[:, :, :width + add]
            return self.keys, self.values

        def reset(self) -> None:  # pragma: no cover - not used by the decoder
            super().reset()
            self._kbuf = self._vbuf = None

else:  # pragma: no cover
    GrowingLayer = None  # type: ignore[assignment,misc]


def left_padded(rows: Sequence[Sequence[int]], new: int, pad: int):
    """The inputs of one prefill forward over ``rows`` (token id lists) in the left-padded
    layout every decode group uses: the last ``new`` tokens of each row are fed (``ids``
    ``[B, new]``, padded on the left), the tokens before them come from a past of ``width -
    new`` columns; ``mask`` ``[B, width]`` covers past and new, ``pos`` ``[B, new]`` are the
    positions of the fed tokens (each row starts at 0). ``new`` = the longest row: a plain
    prefill with an empty past."""
    width = max(max(len(r) for r in rows), new)
    ids = torch.full((len(rows), new), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, seq in enumerate(rows):
        tail = seq[len(seq) - min(new, len(seq)):]
        ids[j, new - len(tail):] = torch.tensor(tail, dtype=torch.long)
        mask[j, width - len(seq):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, width - new:]
    return ids, mask, pos


def new_cache():
    """An empty cache whose layers append in place (the stock ``DynamicCache`` where this
    transformers has no layer API)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if GrowingLayer is not None and hasattr(cache, "layer_class_to_replicate") and not cache.layers:
        cache.layer_class_to_replicate = GrowingLayer
    return cache


def cache_from(data: Sequence[Tuple[torch.Tensor, torch.Tensor]]):
    """A cache over ``data`` (one ``(keys, values)`` per layer), without copying it."""
    from transformers import DynamicCache

    cache = new_cache()
    if GrowingLayer is None or cache.layer_class_to_replicate is not GrowingLayer:  # pragma: no cover
        return DynamicCache(list(data))
    cache.layers = [GrowingLayer(k, v) for k, v in data]
    return cache


def is_plain(cache) -> bool:
    """Full-attention layers of ``[rows, heads, width, dim]`` tensors (what the merges, the
    passage KV cache and the scheduler's lanes know how to handle)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(
        type(l).__name__ in ("DynamicLayer", "GrowingLayer") and getattr(l, "keys", None) is not None
        and getattr(l, "values", None) is not None and l.keys.dim() == 4
        for l in layers
    )


def merge_left_padded(parts: Sequence[Tuple[Any, torch.Tensor]]) -> Tuple[Any, torch.Tensor]:
    """One cache and mask from several groups' ``(cache, mask)`` (rows stacked in order, each
    left-padded to the widest), written straight into buffers with spare columns; the parts'
    layers are freed as they are copied (peak: the merged cache plus one layer)."""
    width = max(m.shape[1] for _, m in parts)
    rows = sum(m.shape[0] for _, m in parts)
    n_layers = len(parts[0][0].layers)
    data: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for li in range(n_layers):
        k0 = parts[0][0].layers[li].keys
        shape = (rows, k0.shape[1], width + _spare(width), k0.shape[3])
        kb, vb = k0.new_empty(shape), k0.new_empty(shape)
        r = 0
        for cache, mask in parts:
            layer = cache.layers[li]
            n, w = layer.keys.shape[0], layer.keys.shape[2]
            if w < width:  # left padding (masked out, but kept finite)
                kb[r:r + n, :, :width - w] = 0
                vb[r:r + n, :, :width - w] = 0
            kb[r:r + n, :, width - w:width] = layer.keys
            vb[r:r + n, :, width - w:width] = layer.values
            layer.keys = layer.values = None
            r += n
        data.append((kb, vb))
    mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for _, m in parts])
    cache = _buffered(data, width)
    return cache, mask


def select_rows(cache, keep: torch.Tensor, cut: int = 0):
    """The cache of the rows ``keep`` (an index tensor), without the first ``cut`` columns; the
    old layers are freed as they are copied."""
    data = []
    for layer in cache.layers:
        data.append((layer.keys.index_select(0, keep)[:, :, cut:].contiguous(),
                     layer.values.index_select(0, keep)[:, :, cut:].contiguous()))
        layer.keys = layer.values = None
    return cache_from(data)


def _buffered(buffers: Sequence[Tuple[torch.Tensor, torch.Tensor]], width: int):
    """A cache whose layers view the first ``width`` columns of ``buffers``."""
    from transformers import DynamicCache

    if GrowingLayer is None:  # pragma: no cover
        return DynamicCache([(k[:, :, :width].contiguous(), v[:, :, :width].contiguous()) for k, v in buffers])
    cache = new_cache()
    layers = []
    for kb, vb in buffers:
        layer = GrowingLayer(kb[:, :, :width], vb[:, :, :width])
        layer._kbuf, layer._vbuf = kb, vb
        layers.append(layer)
    cache.layers = layers
    return cache
