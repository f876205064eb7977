"""`quantstudy plan`'s rough run-time estimate: parameter counts agree with transformers', costs move with
the work, cached stages cost nothing, and the plan prints it with its caveat."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from quantstudy.runtime import estimate
from quantstudy.cli import app
from tests.tiny import make_tiny_model


@pytest.mark.parametrize("tied, kv_heads, head_dim", [(True, 2, None), (False, 4, None), (False, 2, 32)])
def test_params_from_config_match_transformers(tied, kv_heads, head_dim):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                      tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)  # not counted: < 0.1% of a real model
    assert estimate.params_from_config(cfg.to_dict()) == model.num_parameters() - norms


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("estimate")
    make_tiny_model(r / "tiny")
    return r


def plan_text(root: Path, name: str, **over) -> str:
    cfg = {"name": name, "output_dir": f"out-{name}", "model": {"source": "tiny"},
           "calibration": {"samples": 4, "max_seq_len": 32},
           "quantize": [{"method": ["rtn", "gptq", "awq"], "group_size": 32}],
           "evaluate": {"tasks": [{"name": "arc_easy", "limit": 100}], "speed": None}}
    cfg.update(over)
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["plan", str(p)])
    assert r.exit_code == 0, r.output
    return r.output


def test_plan_prints_an_estimate_with_its_caveat(root):
    out = " ".join(plan_text(root, "est").split())
    assert "estimated run time: ~" in out and "rough" in out and "2-core CPU" in out and "from its config.json" in out


def test_costs_follow_the_work(root, monkeypatch):
    from quantstudy.cli import open_study
    from quantstudy.study import plan

    def secs(name: str, **over) -> dict[tuple[str, str], float]:
        plan_text(root, name, **over)
        with open_study(root / f"{name}.yaml", None, False, lock=False) as ctx:
            steps = plan(ctx)
            return {(s.stage, s.model): t for s, t in zip(steps, estimate.stage_seconds(ctx, steps))}

    monkeypatch.chdir(root)
    a = secs("est-a", calibration={"samples": 32, "max_seq_len": 256})  # the demo's calibration
    assert a[("quantize", "awq-w4g32-c32")] > a[("quantize", "gptq-w4g32-c32")] > a[("quantize", "rtn-w4g32")] > 0
    b = secs("est-b", calibration={"samples": 32, "max_seq_len": 256}, evaluate={"tasks": [{"name": "arc_easy", "limit": 200}], "speed": None})
    # 100 more items of the same task: the evaluate estimate grows by 100 x the per-item rate, scaled by
    # the model's size relative to SmolLM2-135M (read off RTN's fixed cost, which has no other term)
    scale = a[("quantize", "rtn-w4g32")] / estimate.QUANTIZE_S[estimate.Method.rtn][0]
    assert scale == pytest.approx(estimate.model_params(_ctx_stub(root))[0] / estimate.REFERENCE_PARAMS)
    grow = b[("evaluate", "base")] - a[("evaluate", "base")]
    assert grow == pytest.approx(100 * estimate.EVAL_S_PER_ITEM[estimate.TaskName.arc_easy] * scale)


def test_cached_stages_cost_nothing(root, monkeypatch):
    from quantstudy.cli import open_study
    from quantstudy.study import plan

    monkeypatch.chdir(root)
    plan_text(root, "est-c", quantize=[{"method": "rtn", "group_size": 32}])
    assert CliRunner().invoke(app, ["quantize", str(root / "est-c.yaml")]).exit_code == 0
    with open_study(root / "est-c.yaml", None, False, lock=False) as ctx:
        steps = plan(ctx)
        secs = estimate.stage_seconds(ctx, steps)
    assert [t for s, t in zip(steps, secs) if s.cached] == [0.0, 0.0]
    assert [s.stage for s, t in zip(steps, secs) if t > 0] == ["evaluate", "evaluate"]


def _ctx_stub(root: Path):
    from types import SimpleNamespace

    return SimpleNamespace(cfg=SimpleNamespace(model=SimpleNamespace(source="tiny")), config_dir=root)


def test_plan_writes_nothing(root):
    """`plan` runs nothing and must leave no trace: no study folder, no empty store."""
    plan_text(root, "est-d")
    assert not (root / "out-est-d").exists()


def test_measure_estimate_follows_rounds_and_tokens(root, monkeypatch):
    from quantstudy.cli import open_study
    from quantstudy.study import plan

    def measure_secs(name: str, speed: dict) -> float:
        plan_text(root, name, evaluate={"tasks": ["arc_easy"], "speed": speed})
        with open_study(root / f"{name}.yaml", None, False, lock=False, planning=True) as ctx:
            steps = plan(ctx)
            return sum(t for s, t in zip(steps, estimate.stage_seconds(ctx, steps)) if s.stage == "measure")

    one = measure_secs("est-m1", {"prompts": 4, "max_new_tokens": 16, "rounds": 1})
    three = measure_secs("est-m3", {"prompts": 4, "max_new_tokens": 16, "rounds": 3})
    longer = measure_secs("est-m4", {"prompts": 4, "max_new_tokens": 32, "rounds": 1})
    assert three > longer > one > 0
