"""Speed/memory measurement: statistics against numpy and hand counts; metrics land in the store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from quantstudy.config import parse_config
from quantstudy.runtime.context import RunContext
from quantstudy.stages.measure import GenStat, percentile, speed_prompts, summarize
from quantstudy.runtime.modeldir import weights_size
from quantstudy.store import ModelRecord, Store
from quantstudy.study import run_stage
from tests.tiny import make_tiny_model


@pytest.mark.parametrize("n", [1, 2, 5, 8, 19])
def test_percentile_matches_numpy(n):
    xs = list(np.random.default_rng(n).exponential(size=n))
    for q in (0, 25, 50, 95, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q), rel=1e-12)


def test_summarize_counts_by_hand():
    stats = [GenStat(1.0, 0.1, 64, True, False),  # ran to the budget
             GenStat(0.5, 0.2, 10, False, False),
             GenStat(0.1, 0.1, 1, False, True),  # EOS at once: one token, empty text
             GenStat(2.4, 0.2, 64, True, True)]  # 64 whitespace tokens: hit the budget and empty
    s = summarize(stats)
    assert s["hit_max_share"] == 0.5 and s["empty_share"] == 0.5
    assert s["tokens_per_response"] == (64 + 10 + 1 + 64) / 4
    assert s["tokens_per_s"] == pytest.approx(139 / 4.0)
    assert s["latency_mean_s"] == pytest.approx(1.0) and s["ttft_mean_s"] == pytest.approx(0.15)
    assert s["latency_p50_s"] == pytest.approx(np.percentile([1.0, 0.5, 0.1, 2.4], 50))
    assert s["latency_p95_s"] == pytest.approx(np.percentile([1.0, 0.5, 0.1, 2.4], 95))


def _ctx(tmp_path: Path, data_dir: Path, prompts: int, max_new: int, rounds: int = 1) -> RunContext:
    cfg = parse_config({"name": "m", "model": {"source": "x"},
                        "evaluate": {"speed": {"prompts": prompts, "max_new_tokens": max_new, "warmup": 1,
                                                      "rounds": rounds}}})
    return RunContext(cfg=cfg, study_dir=tmp_path, config_dir=tmp_path, store=Store(tmp_path / "s.sqlite"),
                      data_dir=data_dir, device="cpu", console=Console(quiet=True))


def _sharegpt(root: Path, prompts: list[str]) -> Path:
    f = root / "data" / "sharegpt" / "ShareGPT_V3_filtered_500.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps([{"id": f"c{i}", "conversations": [{"from": "human", "value": p}]}
                             for i, p in enumerate(prompts)]))
    return root / "data"


def test_prompts_are_the_first_user_turns(tmp_path):
    data = _sharegpt(tmp_path, ["first", "   ", "second", "third"])
    assert speed_prompts(_ctx(tmp_path, data, 2, 4), 2) == ["first", "second"]  # blank turns skipped


def _expected(model_dir: Path, prompts: list[str], max_new: int) -> list[GenStat]:
    """Independent reference: HF generate (greedy) on the chat-templated prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    out = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      tokenize=False)
        ids = torch.tensor([tok.encode(ids, add_special_tokens=False)])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        gen = gen[0, ids.shape[1]:].tolist()
        n = gen.index(tok.eos_token_id) + 1 if tok.eos_token_id in gen else len(gen)
        out.append(GenStat(1.0, 0.5, n, n == max_new and tok.eos_token_id not in gen[:n],
                           not tok.decode(gen[:n], skip_special_tokens=True).strip()))
    return out


def test_measure_model_writes_labelled_metrics(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_tiny_model(tmp_path / "tiny")
    prompts = ["the cat sat on a mat", "how many dogs ran past", "what is the sum"]
    # make EOS likely where the second prompt's greedy answer has a token the others never produce:
    # that token's output row, slightly scaled, becomes EOS's row -> a mix of stopped and full answers
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    before = []
    for p in prompts:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True), add_special_tokens=False)
        with torch.no_grad():
            before.append(model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                         pad_token_id=tok.pad_token_id)[0, len(ids):].tolist())
    mark = next(t for t in before[1][1:] if t not in before[0] + before[2])
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 1.05 * model.lm_head.weight[mark]
    model.save_pretrained(model_dir)
    want = _expected(model_dir, prompts, 6)
    assert {w.hit_max for w in want} == {True, False}
    ctx = _ctx(tmp_path, _sharegpt(tmp_path, prompts), prompts=3, max_new=6)
    run_stage(ctx, "measure", ModelRecord("base", "baseline", str(model_dir)))
    m = {name: (value, info) for _, name, value, info in ctx.store.metrics("base")}
    for prefix, dtype in (("", "bfloat16"), ("float32.", "float32")):
        for key in ("latency_mean_s", "latency_p50_s", "latency_p95_s", "ttft_mean_s", "tokens_per_response",
                    "tokens_per_s", "hit_max_share", "empty_share", "prefill_s", "batch_tokens_per_s"):
            value, info = m[f"speed.{prefix}{key}"]
            assert info["backend"] == "transformers-dense" and info["weights"] == "dense"
            assert info["activation_dtype"] == dtype and info["rounds"] == 1
            assert info["activations"]["activations_quantized"] is False  # read off the loaded modules (#22)
            assert info["n_prompts"] == 3 and info["max_new_tokens"] == 6 and info["device"] == "cpu"
    assert m["speed.batch_tokens_per_s"][1]["batch_size"] == 3  # speed.batch 8 > 3 prompts: one batch of 3
    ref = summarize(want)  # HF generate in float32: the float32 side must match it exactly
    for key in ("tokens_per_response", "hit_max_share", "empty_share"):
        assert m[f"speed.float32.{key}"][0] == pytest.approx(ref[key]), key
    assert 0 < m["speed.ttft_mean_s"][0] <= m["speed.latency_mean_s"][0]
    peak, info = m["memory.peak_bytes"]
    assert "RSS" in info["measured"] and peak > info["rss_before_load_bytes"] > 0
    # resident weights: bf16 parameters take half the float32 bytes
    assert m["memory.resident_weights_bytes"][0] < 0.6 * m["memory.float32.resident_weights_bytes"][0]
    assert m["memory.weights_bytes"][0] == weights_size(model_dir) > 0
    ratio, rinfo = m["speed.bf16_vs_float32"]  # the root's bf16/float32 pairing
    assert rinfo["lo"] <= ratio <= rinfo["hi"] and rinfo["rounds"] == 1
    # decode rate = tokens after the first / time after the first token: the ratio is bf16's over float32's
    assert ratio > 0 and "bf16 / dense in float32" in rinfo["measured"]


def _side(rates: list[float], others: float, tokens: int = 20, rounds: int = 3) -> dict:
    """A measured side with known per-prompt decode rates (tokens/s) in every round."""
    # ttft 0.1 s, then `tokens - 1` more tokens at `r` tokens/s
    return {"per_round": [[(tokens, 0.1 + (tokens - 1) / r, 0.1) for r in rates] for _ in range(rounds)], "threads": 1,
            "other_cpu_cores": others, "load_1m": [0.5] * rounds, "rounds": rounds}


def test_paired_ratio_recovers_a_known_speedup_and_refuses_a_busy_machine():
    from quantstudy.stages.interleave import cores, paired_ratio

    rng = np.random.default_rng(0)
    parent_rates = list(rng.uniform(10, 30, 8))
    model_rates = [2.0 * r * f for r, f in zip(parent_rates, rng.uniform(0.9, 1.1, 8))]  # true speed-up ~2
    quiet = paired_ratio(_side(parent_rates, 0.0), _side(model_rates, 0.05))
    # ratio of pooled decode rates (tokens after the first over time after the first), by hand
    truth = (3 * 8 * 19 / (3 * sum(19 / r for r in model_rates))) / (3 * 8 * 19 / (3 * sum(19 / r for r in parent_rates)))
    assert quiet["ratio"] == pytest.approx(truth, rel=1e-12)
    assert quiet["lo"] < quiet["ratio"] < quiet["hi"] and 1.8 < quiet["lo"] and quiet["hi"] < 2.2
    assert quiet["comparable"] and quiet["why"] == ""
    busy = paired_ratio(_side(parent_rates, cores() + 1.0), _side(model_rates, cores() + 1.0))
    assert not busy["comparable"] and busy["why"].startswith("not comparable: the machine was busy (load ")
    assert f"on {cores()} cores" in busy["why"]
    uneven = paired_ratio(_side(parent_rates, 0.0), _side(model_rates, 0.9))
    assert not uneven["comparable"] and "differed between the sides" in uneven["why"]


def _rtn(tmp_path: Path) -> tuple[Path, Path]:
    from quantstudy.stages.quantize import run_oneshot
    from quantstudy.config.variants import expand_variants
    from quantstudy.runtime.modeldir import load_pretrained

    base = make_tiny_model(tmp_path / "base")
    cfg = parse_config({"name": "t", "model": {"source": str(base)}, "quantize": [{"method": "rtn", "group_size": 32}]})
    model, tok = load_pretrained(base)
    run_oneshot(model, tok, expand_variants(cfg)[0], None, 0, tmp_path / "q")
    return base, tmp_path / "q"


def _pair_metrics(tmp_path: Path, rounds: int = 3) -> dict:
    base, q = _rtn(tmp_path)
    prompts = ["the cat sat on a mat", "how many dogs ran past", "what is the sum", "one blue house"]
    ctx = _ctx(tmp_path, _sharegpt(tmp_path, prompts), prompts=4, max_new=8, rounds=rounds)
    run_stage(ctx, "measure", ModelRecord("rtn", "quantized", str(q), parent="base"),
              parent=ModelRecord("base", "baseline", str(base)))
    return {name: (value, info) for _, name, value, info in ctx.store.metrics("rtn")}


def test_paired_measure_of_a_packed_variant(tmp_path):
    """A tiny RTN model: packed against its parent, labelled, with its numerics check."""
    m = _pair_metrics(tmp_path)
    value, info = m["speed.latency_mean_s"]
    assert info["backend"] == "torch-int4pack-cpu" and info["weights"] == "packed"
    assert info["activation_dtype"] == "bfloat16" and info["prefill"].startswith("not accelerated")
    assert m["speed.parent.latency_mean_s"][1]["backend"] == "transformers-dense"
    ratio, rinfo = m["speed.speedup"]
    assert rinfo["lo"] <= ratio <= rinfo["hi"] and rinfo["rounds"] == 3 and rinfo["parent"] == "base"
    assert m["memory.resident_weights_bytes"][0] < m["memory.parent.resident_weights_bytes"][0]
    assert 0 <= m["numerics.kl_packed_vs_decompressed"][0] < 0.01
    assert m["numerics.top1_packed_vs_decompressed"][0] > 0.9
    from quantstudy.report.deploy import deploy_row

    row = deploy_row("rtn", "quantized", None, m, deploy_row("base", "baseline", None, {}, None))
    assert row.caveat == ""  # packed figures: no "not a 4-bit deployment figure"
    # the parent's bf16/float32 ratio chains into a figure against float32 (a hand computation)
    root = deploy_row("base", "baseline", None, {
        "speed.tokens_per_s": (10.0, {}), "speed.float32.tokens_per_s": (12.0, {}),
        "memory.peak_bytes": (1000.0, {}), "memory.float32.peak_bytes": (800.0, {}),
        "speed.bf16_vs_float32": (0.8, {"comparable": True, "lo": 0.7, "hi": 0.9, "rounds": 3})}, None)
    chained = deploy_row("rtn", "quantized", None, m, root)
    assert root.bf16_vs_float32 == 0.8 and root.float32_peak_bytes == 800.0
    if rinfo["comparable"]:
        assert f"vs the parent dense in float32 ~{ratio * 0.8:.2f}x" in chained.speedup_note
    peak = m["memory.peak_bytes"][0]
    parent_peak = m["memory.parent.peak_bytes"][0]
    assert chained.mem_reduction_pct == pytest.approx(100 * (parent_peak - peak) / parent_peak)
    assert chained.mem_reduction_vs_float32_pct == pytest.approx(100 * (800.0 - peak) / 800.0)
    if rinfo["comparable"]:  # a quiet machine: the ratio with its interval
        assert row.speedup == ratio and f"{rinfo['lo']:.2f}-{rinfo['hi']:.2f}x" in row.speedup_note
    else:
        assert row.speedup is None and row.speedup_note.startswith("not comparable")


@pytest.mark.slow
def test_busy_machine_refuses_the_speedup(tmp_path):
    """CPU burners compete with the measurement: the report must print 'not comparable', not a ratio."""
    import subprocess
    import sys

    from quantstudy.stages.interleave import cores
    from quantstudy.report.deploy import deploy_row

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores() + 1)]
    try:
        m = _pair_metrics(tmp_path)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    _, rinfo = m["speed.speedup"]
    assert not rinfo["comparable"] and rinfo["why"].startswith("not comparable: the machine was busy")
    parent = deploy_row("base", "baseline", None, {}, None)
    row = deploy_row("rtn", "quantized", None, {k: (v, i) for k, (v, i) in m.items()}, parent)
    assert row.speedup is None and row.speedup_note.startswith("not comparable: the machine was busy")
    assert row.caveat == ""  # packed figures: no "not a 4-bit deployment figure"


def test_root_sides_that_do_not_fit_together_run_one_after_the_other(tmp_path, monkeypatch):
    """bf16 + float32 of the root model loaded at once would not fit: float32 runs after bf16, labelled."""
    from quantstudy.stages import measure

    model_dir = make_tiny_model(tmp_path / "tiny")
    prompts = ["the cat sat on a mat", "how many dogs ran past"]
    need_both = measure.side_bytes(ModelRecord("b", "baseline", str(model_dir)), 2) + \
        measure.side_bytes(ModelRecord("b", "baseline", str(model_dir)), 4)
    monkeypatch.setattr(measure, "memory_available", lambda: need_both - 1)
    ctx = _ctx(tmp_path, _sharegpt(tmp_path, prompts), prompts=2, max_new=4)
    run_stage(ctx, "measure", ModelRecord("base", "baseline", str(model_dir)))
    m = {name: info for _, name, _, info in ctx.store.metrics("base")}
    assert m["speed.float32.tokens_per_s"]["interleaved"].startswith("no: measured after the bf16 side")
    assert m["speed.tokens_per_s"]["interleaved"].startswith("yes")


def test_a_pairing_that_does_not_fit_is_one_clear_error(tmp_path, monkeypatch):
    from quantstudy.stages import measure
    from quantstudy.errors import QuantStudyError

    base, q = _rtn(tmp_path)
    monkeypatch.setattr(measure, "memory_available", lambda: 2.0**30)  # 1 GiB: less than two interpreters
    ctx = _ctx(tmp_path, _sharegpt(tmp_path, ["the cat sat"]), prompts=1, max_new=4)
    with pytest.raises(QuantStudyError) as e:
        run_stage(ctx, "measure", ModelRecord("rtn", "quantized", str(q), parent="base"),
                  parent=ModelRecord("base", "baseline", str(base)))
    assert e.value.field == "evaluate.speed" and "evaluate.speed: null" in e.value.fix
    assert not [n for _, n, _, _ in ctx.store.metrics("rtn")]  # nothing half-written
