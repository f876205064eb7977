"""What a deployment cares about, per model: speed, memory, size, generation health, fidelity.

Speed and memory are read from the store's `speed.*` / `memory.*` metrics together with how
they were taken (info: backend, weights packed/decompressed, activation dtype, measured). The
definitions follow design.md:
  speed-up         = the paired `speed.speedup` (measure.py: model and parent interleaved in one
                     window, batch-1 decode rate ratio, > 1 = faster) with its 95% interval; when the
                     machine was busy the measurement's own "not comparable: ..." replaces it. A store
                     without it (older studies) falls back to parent latency / model latency, marked
                     unpaired. Either way only when both generated a comparable number of tokens per
                     response (ratio within TOKENS_COMPARABLE); otherwise a generation-health warning.
  memory reduction = parent peak - model peak (bytes and % of parent), with the method; the parent's
                     peak from the same paired measurement when there is one.
Generation health is recomputed from the evaluation items of generative tasks (hit
max_new_tokens, empty text (only where an answer is expected: not SQuAD v2's unanswerable
items), generated tokens) and read from the speed benchmark's metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from quantstudy.store import ItemRecord
from quantstudy.tasks.base import reasoning_stats

TOKENS_COMPARABLE = 1.25  # speed-up is shown only if tokens/response differ by less than this factor
HIT_MAX_FLAG = 0.20  # share of responses cut at max_new_tokens that counts as a pathology ...
EMPTY_FLAG = 0.05  # share of empty responses that counts as a pathology ...
VS_PARENT = 2.0  # ... when also this many times the parent's share (a parent's own habit is not the variant's)
TOKENS_FLAG = 2.0  # mean tokens per response this many times (or 1/this of) the parent's
HEALTH_RULE = (f"flagged when >= {HIT_MAX_FLAG:.0%} of responses hit max_new_tokens or >= {EMPTY_FLAG:.0%} are "
               f"empty (for a derived model: also >= {VS_PARENT:g}x its parent's share), or when mean tokens per "
               f"response is >= {TOKENS_FLAG:g}x or <= 1/{TOKENS_FLAG:g} of the parent's; the speed benchmark stops "
               "at its own short cap by design, so its hit-max share is judged only against the parent")
NOT_4BIT = "not a 4-bit deployment figure"
UNPAIRED = "unpaired: parent and model measured at different times"
SPEED = "speed benchmark"


@dataclass
class Health:
    model: str
    source: str  # a generative task name, or "speed benchmark"
    n: int | None
    hit_max_share: float | None
    empty_share: float | None
    mean_tokens: float | None
    flags: list[str] = field(default_factory=list)
    # responses with a reasoning block (<think>...</think>): their share, mean tokens spent in the block,
    # the share of all responses whose reasoning hit max_new_tokens (no answer), and one answer read after it
    reasoning_share: float | None = None
    reasoning_tokens: float | None = None
    reasoning_hit_max_share: float | None = None
    answer_example: str | None = None


@dataclass
class Deploy:
    model: str
    size_bytes: int | None
    size_reduction_pct: float | None  # vs parent, % of the parent's size
    latency_s: float | None
    latency_p95_s: float | None
    ttft_s: float | None
    tokens_per_response: float | None
    tokens_per_s: float | None
    peak_bytes: float | None
    backend: str | None  # how speed/memory were measured (from the metrics' info)
    weights: str | None  # "packed" | "decompressed"
    measured: str | None  # "process peak RSS" | "CUDA allocator peak"
    speedup: float | None = None
    speedup_note: str = ""  # why there is no speed-up number, or its caveat
    mem_reduction_bytes: float | None = None
    mem_reduction_pct: float | None = None
    caveat: str = ""  # NOT_4BIT when a quantized model ran with decompressed weights
    speedup_lo: float | None = None  # 95% interval of the paired speed-up
    speedup_hi: float | None = None
    kl_packed: float | None = None  # KL(decompressed || packed) per token on the speed prompts
    top1_packed: float | None = None  # top-1 agreement packed vs decompressed
    activation_dtype: str | None = None
    # a root model: its dense float32 figures and the paired bf16/float32 decode ratio (speed.bf16_vs_float32)
    float32_tokens_per_s: float | None = None
    float32_peak_bytes: float | None = None
    bf16_vs_float32: float | None = None  # None when not measured or not comparable
    bf16_vs_float32_note: str = ""
    mem_reduction_vs_float32_pct: float | None = None  # a variant: its peak vs the root's float32 run


def _metric(metrics: dict[str, tuple[float | None, dict[str, Any]]], name: str) -> float | None:
    v = metrics.get(name, (None, {}))[0]
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def deploy_row(model: str, role: str, size: int | None, metrics: dict[str, tuple[float | None, dict[str, Any]]],
               parent: Deploy | None) -> Deploy:
    info = metrics.get("speed.latency_mean_s", metrics.get("memory.peak_bytes", (None, {})))[1]
    mem_info = metrics.get("memory.peak_bytes", (None, info))[1]
    d = Deploy(model, size, None, _metric(metrics, "speed.latency_mean_s"), _metric(metrics, "speed.latency_p95_s"),
               _metric(metrics, "speed.ttft_mean_s"), _metric(metrics, "speed.tokens_per_response"),
               _metric(metrics, "speed.tokens_per_s"), _metric(metrics, "memory.peak_bytes"),
               info.get("backend"), info.get("weights") or mem_info.get("weights"),
               mem_info.get("measured") or info.get("measured"))
    if role == "quantized" and d.weights == "decompressed":
        d.caveat = NOT_4BIT
    d.activation_dtype = info.get("activation_dtype") or info.get("dtype")
    d.kl_packed = _metric(metrics, "numerics.kl_packed_vs_decompressed")
    d.top1_packed = _metric(metrics, "numerics.top1_packed_vs_decompressed")
    if parent is None:
        d.float32_tokens_per_s = _metric(metrics, "speed.float32.tokens_per_s")
        d.float32_peak_bytes = _metric(metrics, "memory.float32.peak_bytes")
        if (ratio := metrics.get("speed.bf16_vs_float32")) is not None:
            value, rinfo = ratio
            if rinfo.get("comparable"):
                d.bf16_vs_float32 = value
                d.bf16_vs_float32_note = (f"paired, 95% CI {rinfo.get('lo'):.2f}-{rinfo.get('hi'):.2f}x, "
                                          f"{rinfo.get('rounds')} interleaved rounds, decode at batch 1")
            else:
                d.bf16_vs_float32_note = rinfo.get("why") or "not comparable"
        return d
    if size and parent.size_bytes:
        d.size_reduction_pct = 100 * (parent.size_bytes - size) / parent.size_bytes
    parent_peak = _metric(metrics, "memory.parent.peak_bytes") or parent.peak_bytes  # same window if paired
    if d.peak_bytes is not None and parent_peak:
        d.mem_reduction_bytes = parent_peak - d.peak_bytes
        d.mem_reduction_pct = 100 * d.mem_reduction_bytes / parent_peak
        if parent.float32_peak_bytes:
            d.mem_reduction_vs_float32_pct = 100 * (parent.float32_peak_bytes - d.peak_bytes) / parent.float32_peak_bytes
    paired = metrics.get("speed.speedup")
    ptok = _metric(metrics, "speed.parent.tokens_per_response") if paired else parent.tokens_per_response
    if paired is None and not (d.latency_s and parent.latency_s):
        return d
    tok = d.tokens_per_response
    if tok and ptok and max(tok / ptok, ptok / tok) >= TOKENS_COMPARABLE:
        d.speedup_note = (f"no speed-up: generates {tok / ptok:.1f}x the tokens per response of "
                          f"{parent.model} ({tok:.0f} vs {ptok:.0f}); latencies are not comparable")
    elif paired is not None:
        value, pinfo = paired
        if not pinfo.get("comparable"):
            d.speedup_note = pinfo.get("why") or "not comparable"
        else:
            d.speedup, d.speedup_lo, d.speedup_hi = value, pinfo.get("lo"), pinfo.get("hi")
            d.speedup_note = (f"paired, 95% CI {d.speedup_lo:.2f}-{d.speedup_hi:.2f}x, {pinfo.get('rounds')} "
                              f"interleaved rounds, decode at batch 1")
            if parent.bf16_vs_float32 is not None and pinfo.get("activation_dtype") == "bfloat16":
                # two paired ratios multiplied: model/bf16 parent x bf16/float32 parent, measured at two times
                d.speedup_note += (f"; vs the parent dense in float32 ~{value * parent.bf16_vs_float32:.2f}x "
                                   f"(chained through the parent's bf16/float32 pairing)")
    else:
        d.speedup = parent.latency_s / d.latency_s  # type: ignore[operator]
        d.speedup_note = UNPAIRED if tok and ptok else \
            f"{UNPAIRED}; tokens per response not recorded: equal generation length not verified"
    return d


def _empty(r: ItemRecord) -> bool:
    text = r.details.get("text", r.prediction)
    return not str(text or "").strip()


def _answer_expected(r: ItemRecord) -> bool:
    """False for SQuAD v2's unanswerable items, where an empty response is the right answer."""
    return r.details.get("has_answer") is not False


def health_rows(model: str, items: dict[str, list[ItemRecord]], metrics: dict[str, tuple[float | None, dict]],
                parent_rows: list[Health] | None) -> list[Health]:
    """Health per generative task (from items) and for the speed benchmark (from metrics), with flags."""
    rows = []
    for task, recs in items.items():
        gen = [r for r in recs if r.n_tokens is not None]
        answerable = [r for r in gen if _answer_expected(r)]
        if gen:
            empty = sum(map(_empty, answerable)) / len(answerable) if answerable else None
            rows.append(Health(model, task, len(gen), sum(bool(r.hit_max) for r in gen) / len(gen), empty,
                               sum(r.n_tokens for r in gen) / len(gen)))
            think = reasoning_stats(gen)  # the figures the evaluate stage stores, from the same function
            if think:
                h = rows[-1]
                h.reasoning_share, h.reasoning_tokens, h.reasoning_hit_max_share = (
                    think["reasoning_share"], think["reasoning_tokens_mean"], think["reasoning_hit_max_share"])
                h.answer_example = next((str(r.details.get("text", "")) for r in gen
                                         if "reasoning_tokens" in r.details and r.details.get("reasoning_closed")), None)
    bench = [_metric(metrics, k) for k in ("speed.hit_max_share", "speed.empty_share", "speed.tokens_per_response")]
    if any(v is not None for v in bench):
        rows.append(Health(model, SPEED, None, *bench))
    by_source = {h.source: h for h in parent_rows or []}
    for h in rows:
        h.flags = _flags(h, by_source.get(h.source))
    return rows


def _flags(h: Health, parent: Health | None) -> list[str]:
    out = []
    # the speed benchmark caps generation at its own short max_new_tokens on purpose: hitting it is
    # no pathology by itself, only when a derived model hits it far more often than its parent
    capped = h.source == SPEED and parent is None
    for share, floor, what, p_share in (
            (None if capped else h.hit_max_share, HIT_MAX_FLAG, "of responses hit max_new_tokens",
             parent and parent.hit_max_share),
            (h.empty_share, EMPTY_FLAG, "empty responses", parent and parent.empty_share)):
        if share is not None and share >= floor and (not p_share or share >= VS_PARENT * p_share):
            out.append(f"{share:.0%} {what}" + (f" (parent {p_share:.0%})" if parent and p_share is not None else ""))
    if parent and h.mean_tokens and parent.mean_tokens:
        r = h.mean_tokens / parent.mean_tokens
        if r >= TOKENS_FLAG or r <= 1 / TOKENS_FLAG:
            out.append(f"{r:.1f}x the parent's tokens per response ({h.mean_tokens:.0f} vs {parent.mean_tokens:.0f})")
    return out
