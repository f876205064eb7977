"""One left-padded batch of greedy generation: the speed benchmark's loop, and lm-eval's order.

`generate_tokens` runs one batch until every row stops (EOS, a stop string, max_new); `generate_batches`
runs many requests that way, longest prompts first, as lm-eval's HF backend does (the fallback of
generation.generate_continuous for models whose cache cannot take fixed slots).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from quantstudy.data.chat import Think, split_reasoning



@dataclass
class Generation:
    tokens: list[int]  # generated ids, up to and including the one that completed a stop
    hit_max: bool  # ran to max_new_tokens without a stop
    ttft_s: float  # prompt processing + first token, from the start of the batch
    seconds: float  # start of the batch until this sequence stopped
    cost_s: float = 0.0  # generate_continuous: this request's share of the forward passes' wall time


@torch.inference_mode()
def generate_tokens(model: Any, tok: Any, prompts: list[list[int]], max_new: int, stops: list[str],
                    device: str = "cpu", thinks: list[Think | None] | None = None) -> list[Generation]:
    """Greedy decoding of a left-padded batch with a KV cache.

    Each sequence stops at EOS or at its first stop string (checked on the decoded text, as
    lm-eval's stopping criteria do); a stopped sequence is dropped from the batch and its
    cache rows with it, so it costs no further compute. With reasoning markers (`thinks`, one per
    prompt) stop strings are looked for only in the answer after the reasoning block: a reasoning
    trace often contains them ("Question:", blank lines), and cutting it there loses the answer.
    """
    from transformers import DynamicCache

    eos = {tok.eos_token_id} | set(as_list(getattr(model.generation_config, "eos_token_id", None)))
    eos.discard(None)
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), tok.pad_token_id or 0, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], attn[b, width - len(p):] = torch.tensor(p), 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # as HF generate: positions count real tokens only
    cache = DynamicCache(config=model.config)
    out: list[list[int]] = [[] for _ in range(n)]
    res: list[Generation | None] = [None] * n
    live = list(range(n))  # batch row -> sequence index
    t0, ttft = time.perf_counter(), 0.0
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits
    for step in range(max_new):
        nxt = logits[:, -1].argmax(-1)
        if step == 0:
            ttft = time.perf_counter() - t0
        keep = []
        for r, (b, t) in enumerate(zip(live, nxt.tolist())):
            out[b].append(t)
            stopped = t in eos
            if stops and not stopped:  # no decoding without stop strings: the speed benchmark times this loop
                answer = split_reasoning(tok.decode(out[b]), thinks[b] if thinks else None).answer
                stopped = any(s in answer for s in stops)
            if stopped or step == max_new - 1:
                res[b] = Generation(out[b], not stopped, ttft, time.perf_counter() - t0)
            else:
                keep.append(r)
        if not keep:
            break
        if len(keep) < len(live):  # drop finished rows from the batch and the cache
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            nxt, attn, pos = nxt[sel], attn[sel], pos[sel]
            live = [live[r] for r in keep]
        attn = torch.cat([attn, attn.new_ones(len(live), 1)], dim=1)
        pos = pos[:, -1:] + 1
        logits = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits
    return res  # type: ignore[return-value]


def as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]



def generate_batches(model: Any, tok: Any, prompts: list[list[int]], max_new: int, stops: list[str], device: str,
             thinks: list[Think | None] | None, batch_size: int) -> list[Generation]:
    """generate_tokens one batch at a time, longest prompts first (lm-eval's order)."""
    idx = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    res: list[Generation | None] = [None] * len(prompts)
    for b in range(0, len(idx), batch_size):
        chunk = idx[b:b + batch_size]
        t0 = time.perf_counter()
        gens = generate_tokens(model, tok, [prompts[i] for i in chunk], max_new, stops, device,
                               [thinks[i] for i in chunk] if thinks else None)
        share = (time.perf_counter() - t0) / len(chunk)
        for i, g in zip(chunk, gens):
            g.cost_s = share
            res[i] = g
    return res  # type: ignore[return-value]
