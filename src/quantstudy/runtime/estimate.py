"""A rough duration estimate for `quantstudy plan`, so a newcomer knows what a run will cost.

Each stage's cost is a fixed part plus a rate times its work (items, generated tokens, calibration
or fidelity tokens, training rows), measured for SmolLM2-135M-Instruct (float32) on the 2-core CPU
this project is developed on, and scaled by the model's parameter count. It ignores downloads,
other load on the machine and the speed of any other hardware: read it as "minutes or hours",
not as a deadline. A GPU is usually much faster; a busy CPU slower.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantstudy.config import Method, TaskName

REFERENCE_PARAMS = 135e6  # SmolLM2-135M: the model the rates below were measured on

# Measured with SmolLM2-135M-Instruct, float32, fast backend, batch 16 (seconds):
# resolve of the built-in GGUF (dequantize + save); per-stage model load; quantize = fixed + per
# calibration token; fidelity per scored token (a variant pass; the baseline pass once per parent).
RESOLVE_S = {"builtin": 45.0, "gguf": 45.0, "local": 3.0, "hub": 10.0}
LOAD_S = 4.0
QUANTIZE_S = {Method.rtn: (5.0, 0.0), Method.gptq: (40.0, 0.008), Method.awq: (30.0, 0.05),
              Method.autoround: (30.0, 0.03)}  # autoround: a guess at 50 iterations (#22), to replace with time.quantize
FIDELITY_S_PER_TOKEN = 0.0012
TRAIN_S_PER_ROW = 2.0  # LoRA, max_seq_len 384: README's train_speed benchmark (200 rows in 6.6 min)
# evaluation: seconds per multiple-choice / rolling item; a generative item costs its prompt's prefill
# plus a rate per generated-token slot (items x max_new_tokens: rows that run to the limit set the tail).
# Measured on the demo's base model (load ~2, 2026-12-04): ARC-Easy 40 items 3.9 s, ARC-Challenge 40 6.3 s,
# HellaSwag 40 8.0 s, MMLU 57 14.8 s, WikiText 2 documents 33.1 s, OpenMathInstruct-2 10 x 128 28.4 s (old
# generation code: per slot only). SQuAD v2 and GSM8K from benchmarks/eval_speed.py (#21, continuous
# batching, load ~2, 256 slots): SQuAD 200 items prefill 37.9 s + decode 52.0 s (passages shared, answers
# stop at the newline); GSM8K 100 items prefill 256.0 s (5-shot prompts of ~1040 tokens) + decode 81.4 s.
EVAL_S_PER_ITEM = {TaskName.arc_easy: 0.1, TaskName.arc_challenge: 0.16, TaskName.hellaswag: 0.2,
                   TaskName.mmlu: 0.26, TaskName.wikitext: 16.5}
EVAL_S_GEN = {TaskName.squad_v2: (0.19, 0.001), TaskName.gsm8k: (2.56, 0.0032),  # (s per item, s per slot)
              TaskName.openmathinstruct2: (0.0, 0.022)}
# the speed benchmark: two processes (a root model in bf16 and float32, or a derived model and its
# parent), each loading its model and warming up (MEASURE_FIXED_S in all, with the packed-vs-dense
# numerics check), then per round and side the prompts one at a time and one batch, max_new_tokens
# each; seconds per generated token of dense bf16 on this AVX2 CPU (no native bf16): 16.5 tok/s at
# batch 1, ~12 tok/s at batch 8 (benchmarks/packed_speed.py; float32 9.4, packed int4 ~19 at batch 1)
MEASURE_FIXED_S, MEASURE_S_PER_TOKEN, MEASURE_S_PER_BATCH_TOKEN = 40.0, 0.07, 0.08
# items in the evaluated split when no limit is set (the offline files of ../shared/data)
FULL_ITEMS = {TaskName.arc_easy: 2376, TaskName.arc_challenge: 1172, TaskName.hellaswag: 10042,
              TaskName.mmlu: 14042, TaskName.squad_v2: 11873, TaskName.gsm8k: 1319,
              TaskName.openmathinstruct2: 1000, TaskName.wikitext: 62}

NOTE = ("rough: calibrated on SmolLM2-135M on this project's 2-core CPU, scaled by parameter count; "
        "downloads, machine load and other hardware not counted")


def rough(seconds: float) -> str:
    """An estimate's precision: tens of seconds below 2 minutes, whole minutes above."""
    return f"~{max(10, round(seconds, -1)):.0f} s" if seconds < 120 else f"~{round(seconds / 60):.0f} min"


def model_params(ctx: Any) -> tuple[float, str]:
    """(parameters, how known): from config.json of a local model dir, else the reference size."""
    from quantstudy.stages.resolve import SourceKind, classify

    m = ctx.cfg.model
    kind = classify(m.source, ctx.config_dir)
    if kind == SourceKind.builtin:
        return REFERENCE_PARAMS, "built-in SmolLM2-135M"
    if kind == SourceKind.local:
        p = Path(m.source) if Path(m.source).is_absolute() else ctx.config_dir / m.source
        try:
            return params_from_config(json.loads((p / "config.json").read_text())), "from its config.json"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return REFERENCE_PARAMS, "unknown size: assumed 135M"


def params_from_config(c: dict[str, Any]) -> float:
    """Decoder-only transformer: embeddings (+ untied head) + per layer attention and gated MLP."""
    c = c.get("text_config", c)
    h, layers, vocab, inter = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    heads = c.get("num_attention_heads", 1)
    kv = c.get("num_key_value_heads", heads)
    head_dim = c.get("head_dim") or h // heads
    attn = h * head_dim * (heads * 2 + kv * 2)
    emb = vocab * h * (1 if c.get("tie_word_embeddings", True) else 2)
    return float(emb + layers * (attn + 3 * h * inter))


def stage_seconds(ctx: Any, steps: list[Any]) -> list[float]:
    """Estimated seconds for each step (0 for a cached one)."""
    from quantstudy.stages.resolve import classify
    from quantstudy.study import variant_of

    cfg = ctx.cfg
    params, _ = model_params(ctx)
    scale = params / REFERENCE_PARAMS
    out, baselines = [], set()
    for s in steps:
        if s.cached:
            out.append(0.0)
            continue
        if s.stage == "resolve":
            sec = RESOLVE_S[classify(cfg.model.source, ctx.config_dir).value] * max(scale, 1.0)
        elif s.stage == "train":
            t = cfg.train
            rows = t.max_steps * t.batch_size * t.grad_accum if getattr(t, "max_steps", None) else t.samples * t.epochs
            sec = LOAD_S + TRAIN_S_PER_ROW * rows * (t.max_seq_len / 384) * scale
        elif s.stage == "quantize":
            v = variant_of(ctx, s.model)
            fixed, per_token = QUANTIZE_S[v.method]
            tokens = v.calibration.samples * v.calibration.max_seq_len if v.calibration else 0
            sec = (fixed + per_token * tokens) * scale
        elif s.stage == "evaluate":
            sec = LOAD_S * scale + sum(_task_seconds(spec, cfg.evaluate.max_new_tokens)
                                       for spec in cfg.evaluate.task_specs()) * scale
        elif s.stage == "measure":
            sp = cfg.evaluate.speed
            per_side_round = sp.max_new_tokens * (MEASURE_S_PER_TOKEN * sp.prompts +
                                                  MEASURE_S_PER_BATCH_TOKEN * min(sp.batch, sp.prompts))
            sec = (MEASURE_FIXED_S + 2 * sp.rounds * per_side_round) * scale  # two sides, interleaved
        elif s.stage == "fidelity":
            f = cfg.fidelity
            passes = 1 if s.parents[0] in baselines else 2  # the parent's top-k cache is computed once
            baselines.add(s.parents[0])
            sec = 2 * LOAD_S + FIDELITY_S_PER_TOKEN * f.tokens * passes * scale
        else:
            sec = 0.0
        out.append(sec)
    return out


def _task_seconds(spec: Any, max_new_tokens: int) -> float:
    n = spec.limit or FULL_ITEMS[spec.name]
    if spec.name in EVAL_S_GEN:
        per_item, per_slot = EVAL_S_GEN[spec.name]
        return n * (per_item + max_new_tokens * per_slot)
    return n * EVAL_S_PER_ITEM[spec.name]
