"""Greedy generation with a KV cache; each sequence stops on its own stop condition.

`generate_tokens`: one left-padded batch (the speed benchmark's loop). `generate_continuous`: the
evaluate stage's many requests, with prompt prefixes computed once per group of requests that
share them and a batch kept full as requests finish (a finished row's slot takes the next request).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator

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

    eos = {tok.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
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


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ------------------------------------------------------------------ continuous batching
MIN_SHARED = 32  # a shared prompt prefix shorter than this is recomputed per request (a cache copy costs more)
# padded positions per prefill forward pass: bounds its activations and its temporary DynamicCache
# (SmolLM2: 46 KB of keys/values per position, so 94 MB beside the slots; 4096 put a GSM8K-32 run
# over the 3 GiB bound of #21). GSM8K prompts (~1000 tokens) then prefill one or two per pass.
PREFILL_POSITIONS = 2048
# spare columns per slot beyond the longest prompt + max_new: rows shift left only when a step finds
# none left, and after a shift at least max_new + SLACK columns are free unless a long row holds them
SLACK = 32


@dataclass
class GenStats:
    """What generate_continuous computed, summed over calls (the evaluation speed benchmark reads it)."""

    prompt_tokens: int = 0  # prompt tokens of the requests (what prefill costs with no sharing, no padding)
    prefill_positions: int = 0  # positions run through the model in prefill (shared prefixes once, padding included)
    decode_positions: int = 0  # rows x steps of the decode loop (one position each)
    prefill_s: float = 0.0
    decode_s: float = 0.0  # decode forward passes, stop checks included
    steps: int = 0
    cache_bytes: int = 0  # largest slot cache allocated (slots x width x layers x keys and values)


STATS = GenStats()


def slot_width(lmax: int, max_new: int) -> int:
    """Columns per slot: the longest prompt, its max_new tokens and SLACK (see SLACK)."""
    return lmax + max_new + SLACK


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
def _grouped_sdpa(model: Any, device: str) -> Iterator[None]:
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


def shared_prefixes(prompts: list[list[int]], order: list[int], min_shared: int = MIN_SHARED) -> list[int]:
    """Per request, the length of the prefix it shares with its group (0: none), one level of sharing.

    `order` sorts the token lists, so a group is a run of adjacent requests and its common prefix the
    smallest LCP of adjacent members. A run splits where that smallest LCP occurs; it is kept whole or
    split, whichever saves more prefilled tokens ((members - 1) x prefix; prefixes under min_shared
    save nothing). SQuAD: the questions on one passage share title + passage; neighbouring
    passages of one article share only "Title: ..". A prefix stops one token short of a member's
    prompt: each request keeps a token to prefill (its first generated token comes from it)."""
    out = [0] * len(prompts)
    lcps = []
    for x, y in zip(order, order[1:]):
        a, b = prompts[x], prompts[y]
        k = next((j for j, (s, t) in enumerate(zip(a, b)) if s != t), min(len(a), len(b)))
        lcps.append(min(k, len(a) - 1, len(b) - 1))

    def best(lo: int, hi: int) -> tuple[int, list[tuple[int, int, int]]]:  # order[lo..hi] -> (saved, groups)
        if lo == hi:
            return 0, []
        m = min(lcps[lo:hi])
        cuts = [k for k in range(lo, hi) if lcps[k] == m]
        saved, groups = 0, []
        for a, b in zip([lo] + [k + 1 for k in cuts], cuts + [hi]):
            s, g = best(a, b)
            saved, groups = saved + s, groups + g
        whole = (hi - lo) * m if m >= min_shared else 0
        return (whole, [(lo, hi, m)]) if whole > saved else (saved, groups)

    for lo, hi, m in best(0, len(order) - 1)[1]:
        for k in range(lo, hi + 1):
            out[order[k]] = m
    return out


def supports_slots(model: Any) -> bool:
    """Full attention everywhere and an attention that takes a ready 4D mask (SDPA or eager)."""
    cfg = model.config.get_text_config()
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    return types == {"full_attention"} and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager") \
        and not getattr(cfg, "is_encoder_decoder", False)


def _prefill(model: Any, seqs: list[list[int]], prefix: Any, p: int, pad: int, device: str):
    """Forward `seqs` (left-padded) after a shared prefix cache of p positions (batch 1, or None).
    Returns (last-position logits [m, vocab], the DynamicCache, per row the cache columns holding
    real tokens). Padding sits between prefix and suffix; position ids count real tokens only."""
    from transformers import DynamicCache

    m, w = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((m, w), pad, dtype=torch.long)
    attn = torch.zeros(m, w, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, w - len(s):], attn[b, w - len(s):] = torch.tensor(s), 1
    pos = p + (attn.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    if prefix is not None:  # the prefix's keys/values, one copy per row
        for li, layer in enumerate(prefix.layers):
            cache.update(layer.keys.expand(m, -1, -1, -1), layer.values.expand(m, -1, -1, -1), li)
        attn = torch.cat([attn.new_ones(m, p), attn], dim=1)
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    cols = [torch.cat([torch.arange(p), torch.arange(p + w - len(s), p + w)]).to(device) for s in seqs]
    return logits, cache, cols


@torch.inference_mode()
def generate_continuous(model: Any, tok: Any, prompts: list[list[int]], max_new: int, stops: list[str],
                        device: str = "cpu", thinks: list[Think | None] | None = None, batch_size: int = 16,
                        min_shared: int = MIN_SHARED) -> list[Generation]:
    """Greedy decoding of many requests, `batch_size` rows at a time, each stopping as generate_tokens'.

    Requests are admitted in sorted token order, so those sharing a prompt prefix arrive together;
    a shared prefix (`shared_prefixes`) is prefilled once and its keys/values copied to each request.
    A row whose request stops takes the next request at once (its prefill runs as its own forward
    pass, then it joins the decode steps), so the batch stays full until the requests run out.
    Times per request: ttft_s and seconds from its admission; cost_s its share of every forward pass
    it took part in (a step's time split over its rows, a prefill's over its rows, a shared prefix's
    over its group), so the costs of a call add up to the call's compute time.
    """
    from quantstudy.scoring.slotcache import SlotCache

    n = len(prompts)
    if n == 0:
        return []
    if not supports_slots(model):  # e.g. sliding-window layers: lm-eval's order, one padded batch at a time
        return _batches(model, tok, prompts, max_new, stops, device, thinks, batch_size)
    eos = {tok.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    eos.discard(None)
    pad = tok.pad_token_id or 0
    order = sorted(range(n), key=lambda i: prompts[i])
    share = shared_prefixes(prompts, order, min_shared)
    users: dict[tuple[int, ...], int] = {}  # shared prefix -> requests not yet admitted
    for i in range(n):
        if share[i]:
            key = tuple(prompts[i][:share[i]])
            users[key] = users.get(key, 0) + 1
    prefixes: dict[tuple[int, ...], tuple[Any, float]] = {}  # prefix -> (its DynamicCache, cost per user)
    lmax, slots = max(len(p) for p in prompts), min(batch_size, n)
    cache = SlotCache(model.config.get_text_config().num_hidden_layers, slots, slot_width(lmax, max_new), lmax)
    keymask = torch.zeros(slots, cache.width, dtype=torch.bool, device=device)  # [slot, column]: a real token
    pos = torch.zeros(slots, dtype=torch.long, device=device)  # next position id per slot
    start, cur, req = [0] * slots, [0] * slots, [-1] * slots  # first column, next input token, request per slot
    out: list[list[int]] = [[] for _ in range(n)]
    res: list[Generation | None] = [None] * n
    t_in, t_first, cost = [0.0] * n, [0.0] * n, [0.0] * n
    pending = list(reversed(order))  # pop() gives the next in sorted order
    live = 0
    bool_mask = model.config.get_text_config()._attn_implementation == "sdpa"
    dtype = next(model.parameters()).dtype

    def accept(i: int, t: int) -> bool:  # record a generated token; True when request i is finished
        out[i].append(t)
        stopped = t in eos
        if stops and not stopped:  # decoded text, as lm-eval's stopping criteria check it
            stopped = any(s in split_reasoning(tok.decode(out[i]), thinks[i] if thinks else None).answer for s in stops)
        if stopped or len(out[i]) >= max_new:
            now = time.perf_counter()
            res[i] = Generation(out[i], not stopped, t_first[i] - t_in[i], now - t_in[i], cost[i])
            return True
        return False

    def admit(free: list[int]) -> list[int]:
        """Prefill the next requests into the free slots; returns the slots whose request stopped at once."""
        t0 = time.perf_counter()
        take = [pending.pop() for _ in range(min(len(free), len(pending)))]
        groups: dict[tuple[int, ...] | None, list[int]] = {}
        for i in take:
            groups.setdefault(tuple(prompts[i][:share[i]]) if share[i] else None, []).append(i)
        batches = []  # (shared prefix, requests): at most PREFILL_POSITIONS padded positions per forward pass
        for key, members in groups.items():
            p = len(key) if key else 0
            members.sort(key=lambda i: len(prompts[i]))
            b: list[int] = []
            for i in members:
                if b and (len(b) + 1) * (len(prompts[i]) - p) > PREFILL_POSITIONS:
                    batches.append((key, b))
                    b = []
                b.append(i)
            batches.append((key, b))
        done = []
        for key, members in batches:
            p = len(key) if key else 0
            if key is not None and key not in prefixes:  # computed once, kept until its last user is admitted
                t1 = time.perf_counter()
                kv = _prefill(model, [list(key)], None, 0, pad, device)[1]
                prefixes[key] = (kv, (time.perf_counter() - t1) / users[key])  # time split over its users
                STATS.prefill_positions += p
            t1 = time.perf_counter()
            kv, prefix_cost = prefixes[key] if key is not None else (None, 0.0)
            logits, pc, cols = _prefill(model, [prompts[i][p:] for i in members], kv, p, pad, device)
            first = logits.argmax(-1).tolist()
            STATS.prefill_positions += len(members) * max(len(prompts[i]) - p for i in members)
            dt = time.perf_counter() - t1
            suffix = sum(len(prompts[i]) - p for i in members)
            for b, i in enumerate(members):
                s = free.pop(0)
                cache.place(s, [(layer.keys[b], layer.values[b]) for layer in pc.layers], cols[b])
                m = len(prompts[i])
                keymask[s] = False
                keymask[s, cache.col - m:cache.col] = True
                pos[s], start[s], req[s] = m, cache.col - m, i
                t_in[i], t_first[i] = t0, time.perf_counter()
                cost[i] += dt * (len(prompts[i]) - p) / suffix + prefix_cost
                STATS.prompt_tokens += m
                if accept(i, first[b]):
                    done.append(s)
                else:
                    cur[s] = first[b]
            # placed: free this pass's temporary cache now, not when the next pass's result replaces it
            # (both were alive during that pass: up to 2 x 94 MB beside the slots)
            del logits, pc, kv
            if key is not None:
                users[key] -= len(members)
                if users[key] == 0:
                    del prefixes[key]
        STATS.prefill_s += time.perf_counter() - t0
        return done

    def refill(free: list[int]) -> None:
        """Give free slots to pending requests; then close the remaining holes by moving the last rows."""
        nonlocal live
        free = sorted(free)
        while free and pending:
            free = sorted(admit(free) + free)
        for h in sorted(free, reverse=True):  # highest first: a hole at the end just shrinks the batch
            last = live - 1
            if h != last:
                cache.lo = min(start[:live])
                cache.move(last, h)
                keymask[h] = keymask[last]
                pos[h], start[h], cur[h], req[h] = pos[last], start[last], cur[last], req[last]
            live -= 1

    with _grouped_sdpa(model, device):
        live = slots
        refill(list(range(slots)))
        while live:
            t0 = time.perf_counter()
            cache.lo = min(start[:live])
            if cache.col >= cache.width:  # right end reached: shift left, keeping room for the longest prompt
                by = min(cache.lo, cache.col - lmax)
                cache.shift(by, live)
                keymask[:live, cache.lo:cache.col] = keymask[:live, cache.lo + by:cache.col + by].clone()
                keymask[:live, cache.col:] = False
                start[:live] = [x - by for x in start[:live]]
            span = keymask[:live, cache.lo:cache.col + 1].clone()
            span[:, -1] = True  # the token being fed
            mask = span[:, None, None, :]  # [rows, 1, query, keys]
            if not bool_mask:  # eager attention adds the mask to the scores
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
            ids = torch.tensor(cur[:live], device=device)[:, None]
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos[:live, None], past_key_values=cache,
                           use_cache=True).logits[:, -1]
            keymask[:live, cache.col] = True
            cache.col += 1
            pos[:live] += 1
            nxt = logits.argmax(-1).tolist()
            dt = time.perf_counter() - t0
            STATS.steps += 1
            STATS.decode_positions += live
            free = []
            for s in range(live):
                cost[req[s]] += dt / live
                if accept(req[s], nxt[s]):
                    free.append(s)
                else:
                    cur[s] = nxt[s]
            STATS.decode_s += time.perf_counter() - t0
            if free:
                refill(free)
    STATS.cache_bytes = max(STATS.cache_bytes, cache.nbytes())
    return res  # type: ignore[return-value]


def _batches(model: Any, tok: Any, prompts: list[list[int]], max_new: int, stops: list[str], device: str,
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
