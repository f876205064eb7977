"""Continuous batching: the evaluate stage's generation, greedy, each request stopping on its own.

`generate_continuous` runs many requests with prompt prefixes computed once per group of requests
that share them and a batch kept full as requests finish (a finished row's slot takes the next
request). One left-padded batch (the speed benchmark's loop) is batchgen.py; attention without
copied keys on the CPU is attention.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from quantstudy.data.chat import Think, split_reasoning
from quantstudy.scoring.attention import grouped_sdpa
from quantstudy.scoring.batchgen import Generation, as_list, generate_batches


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
        return generate_batches(model, tok, prompts, max_new, stops, device, thinks, batch_size)
    eos = {tok.eos_token_id} | set(as_list(getattr(model.generation_config, "eos_token_id", None)))
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

    with grouped_sdpa(model, device):
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
