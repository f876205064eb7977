"""Grouped-query attention without copied keys, for generation on the CPU (generation.py)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


# transformers' SDPA path copies keys and values num_heads / kv_heads times (repeat_kv) whenever a mask
# is given, which is every slot-cache step: those copies were 25% of the CPU time of SmolLM2 on 16
# GSM8K prompts (profiled), and at 16 rows x 1200 columns one layer's attention took 52 ms with them
# vs 3.3 ms with torch's own grouped-query SDPA, bitwise the same output (torch 2.13 CPU). torch's scaled_dot_product_attention(enable_gqa=True) takes the grouped
# keys as they are; registered under its own name (transformers' AttentionInterface, sdpa's mask
# builder) and switched on around generate_continuous only, on CPU (CUDA with a mask falls back to
# the math kernel, which repeats keys itself).
GQA_SDPA = "quantstudy_sdpa_gqa"


def _sdpa_gqa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa_attention_forward less repeat_kv: query [b, heads, q, d], key/value [b, kv_heads, k, d]."""
    q_len = query.shape[2]
    causal = q_len > 1 and attention_mask is None and (is_causal if is_causal is not None else
                                                       getattr(module, "is_causal", True))
    if causal and key.shape[2] > q_len:  # as transformers: is_causal is upper-left aligned
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def grouped_sdpa(model: Any, device: str) -> Iterator[None]:
    """Inside the block an SDPA model on the CPU attends through _sdpa_gqa; restored afterwards."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    cfg = model.config.get_text_config()
    before = cfg._attn_implementation
    if before != "sdpa" or torch.device(device).type != "cpu":
        yield
        return
    AttentionInterface.register(GQA_SDPA, _sdpa_gqa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_mask)
    cfg._attn_implementation = GQA_SDPA
    try:
        yield
    finally:
        cfg._attn_implementation = before
