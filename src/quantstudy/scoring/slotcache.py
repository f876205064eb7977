"""A KV cache of fixed batch slots for continuous batching: a finished request's slot takes the next one.

transformers' `DynamicCache` grows by `torch.cat` at every step (a copy of the whole cache per
token) and has one length for the whole batch, so a request cannot join a running batch. Here
each layer holds preallocated buffers [slots, kv_heads, width, head_dim]; all live rows write
their next token at one shared column `col`, and a row's tokens sit at the columns just before it
(a newly admitted request is copied in right-aligned to `col`, whatever its length). Each row has
its own position ids and a key mask; a decode step attends over the live span [lo, col] only (a
view, no copy) under that mask, given to the model as a ready 4D mask so transformers builds none.

transformers 5's own continuous batching (`generate_batch`, paged KV blocks) does the admission
too, but stops a request only on EOS ids: lm-eval's stop strings ("Question:", "\\n") must stop a
row the step they appear, or every GSM8K request runs its full 256 tokens; hence this by hand.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, owner: "SlotCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        o = self.owner
        self.keys = key_states.new_zeros(o.slots, key_states.shape[1], o.width, key_states.shape[3])
        self.values = value_states.new_zeros(o.slots, value_states.shape[1], o.width, value_states.shape[3])
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the step's keys/values at column `col` for rows [0, n); return the live span (views)."""
        o, n = self.owner, key_states.shape[0]
        self.keys[:n, :, o.col:o.col + 1] = key_states
        self.values[:n, :, o.col:o.col + 1] = value_states
        return self.keys[:n, :, o.lo:o.col + 1], self.values[:n, :, o.lo:o.col + 1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.col + query_length - self.owner.lo, 0

    def get_seq_length(self) -> int:
        return self.owner.col

    def get_max_length(self) -> int:
        return self.owner.width


class SlotCache(Cache):
    """`slots` rows x `width` columns per layer; rows [0, n) are live (finished rows are swapped out)."""

    def __init__(self, num_layers: int, slots: int, width: int, col: int):
        self.slots, self.width, self.col, self.lo = slots, width, col, col
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    def ready(self) -> bool:
        return all(layer.is_initialized for layer in self.layers)

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (0 before the first request is placed)."""
        return sum(b.nbytes for layer in self.layers if layer.is_initialized for b in (layer.keys, layer.values))

    def place(self, slot: int, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], cols: torch.Tensor) -> None:
        """Copy one request's keys/values ([kv_heads, len, head_dim] each, real tokens only, picked by
        `cols` from a prefill cache row) into `slot`, ending just before column `col`."""
        for layer, (k, v) in zip(self.layers, layer_kv):
            if not layer.is_initialized:
                layer.lazy_initialization(k[None], v[None])
            m = len(cols)
            layer.keys[slot, :, self.col - m:self.col] = k[:, cols]
            layer.values[slot, :, self.col - m:self.col] = v[:, cols]

    def move(self, src: int, dst: int) -> None:
        """Copy row src's live span into slot dst (filling a finished row's slot from the end)."""
        for layer in self.layers:
            layer.keys[dst, :, self.lo:self.col] = layer.keys[src, :, self.lo:self.col]
            layer.values[dst, :, self.lo:self.col] = layer.values[src, :, self.lo:self.col]

    def shift(self, by: int, n: int) -> None:
        """Move every live row's columns left by `by` (the buffer's right end was reached)."""
        for layer in self.layers:
            for buf in (layer.keys, layer.values):
                buf[:n, :, self.lo - by:self.col - by] = buf[:n, :, self.lo:self.col].clone()
        self.lo, self.col = self.lo - by, self.col - by
