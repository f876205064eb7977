"""The study recipe end to end on a tiny model: plan, quantize, cache hits, the study lock."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from quantstudy.cli import app
from quantstudy.store import Store
from tests.tiny import make_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def study(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("study")
    make_tiny_model(root / "tiny", hidden=64)
    cfg = {"name": "tiny", "output_dir": "out", "data_dir": str(shared_data), "model": {"source": "tiny"},
           "calibration": {"source": "sharegpt", "samples": [4, 8], "max_seq_len": 32},
           "quantize": [{"method": ["gptq", "rtn"], "group_size": 32}], "evaluate": None}
    (root / "study.yaml").write_text(yaml.safe_dump(cfg))
    return root / "study.yaml"


def invoke(*args: str):
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


def test_plan_lists_variants_and_runs_nothing(study):
    code, out = invoke("plan", str(study))
    assert code == 0, out
    for name in ("gptq-w4g32-c4", "gptq-w4g32-c8", "rtn-w4g32"):
        assert name in out
    assert "cached" not in out.split("stages")[1]
    assert not (study.parent / "out" / "models").exists()


def test_quantize_then_everything_cached(study):
    code, out = invoke("quantize", str(study))
    assert code == 0, out
    with Store(study.parent / "out" / "store.sqlite") as s:
        names = {m.name: m for m in s.models()}
        assert set(names) == {"base", "gptq-w4g32-c4", "gptq-w4g32-c8", "rtn-w4g32"}
        c4, c8 = s.calibration("gptq-w4g32-c4"), s.calibration("gptq-w4g32-c8")
        assert len(c4) == 4 and len(c8) == 8 and c8[:4] == c4  # shared first N samples, recorded
        assert len(s.layers("gptq-w4g32-c4")) == 14
        assert names["rtn-w4g32"].size_bytes < names["base"].size_bytes
        for m in names.values():
            assert (Path(m.path) / "config.json").is_file()
        versions = json.loads(s.get_meta("versions"))
        assert "llmcompressor" in versions and "torch" in versions
    t0 = time.perf_counter()
    code, out = invoke("quantize", str(study))
    assert code == 0 and time.perf_counter() - t0 < 20, out
    code, out = invoke("plan", str(study))
    assert out.count("will run") == 0, out


def test_second_process_is_refused_while_locked(study):
    from quantstudy.runtime.lock import study_lock

    out_dir = study.parent / "out"
    out_dir.mkdir(exist_ok=True)
    with study_lock(out_dir):
        import subprocess
        import sys

        r = subprocess.run([sys.executable, "-m", "quantstudy.cli", "quantize", str(study)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "is in use by pid" in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_remade_model_keeps_its_making_records_and_drops_old_results(study):
    """A re-made model (new weights) loses everything computed on the old weights, and its new
    making records (metrics, per-layer errors, calibration, loss curve) arrive in the same
    transaction. A re-make with the same weights keeps the results computed on them."""
    from quantstudy.records import ItemBatch, MadeModel, Metric, Metrics
    from quantstudy.store import ItemRecord, ModelRecord

    def made(h: str, loss: list, layers: list) -> MadeModel:
        return MadeModel(ModelRecord("q", "quantized", "/m/q", weights_hash=h), [Metric("quantize.seconds", len(loss))],
                         layers=layers, calibration=[("s0", "h0")], series={"loss": loss})

    with Store(study.parent / "out" / "remade.sqlite") as s:
        s.stage_start("k-old", "quantize", "q")
        s.write(made("h1", [(1, 1.0), (2, 0.9), (3, 0.8)], [("l0", 1.0, 0.1), ("l1", 2.0, 0.1)]), "k-old")
        s.stage_start("k-eval", "evaluate", "q")
        s.write(ItemBatch("q", [ItemRecord("arc_easy", "1", "h", "p", "A", "A", True)]))
        s.write(Metrics("q", [Metric("speed.latency_s", 0.5)]))
        s.write(made("h1", [(1, 0.7), (2, 0.6)], [("l0", 0.5, 0.1)]), "k-same")  # same weights: results stay
        assert s.db.execute("SELECT count(*) FROM items").fetchone()[0] == 1
        assert {n for _, n, _, _ in s.metrics("q")} == {"quantize.seconds", "speed.latency_s"}
        s.stage_start("k-new", "quantize", "q")
        s.write(made("h2", [(1, 0.5)], [("l0", 0.25, 0.1)]), "k-new")  # new weights: old results go
        assert s.series("q", "loss") == [(1, 0.5)]
        assert s.layers("q") == [("l0", 0.25, 0.1)] and s.calibration("q") == [("s0", "h0")]
        assert {(m, n, v) for m, n, v, _ in s.metrics()} == {("q", "quantize.seconds", 1.0)}
        assert not s.db.execute("SELECT count(*) FROM items").fetchone()[0]
        assert [r["key"] for r in s.stages()] == ["k-new"]  # the stage now making it stays
        assert s.model("q").spec["stage_key"] == "k-new"


# ------------------------------------------------------------------ keys declared by their stage (#18)
def _keys(tmp_path: Path, shared_data: Path, **evaluate) -> dict[tuple[str, str], str]:
    """Stage keys of a small study with a trained, quantized and measured model (plan only)."""
    from rich.console import Console

    from quantstudy.config import parse_config
    from quantstudy.runtime.context import RunContext
    from quantstudy.study import plan

    if not (tmp_path / "tiny").is_dir():
        make_tiny_model(tmp_path / "tiny", hidden=64)
    ev = {"tasks": [{"name": "arc_easy", "limit": 8}], "speed": {"prompts": 4, "max_new_tokens": 8}, **evaluate}
    cfg = parse_config({"name": "k", "model": {"source": str(tmp_path / "tiny")}, "evaluate": ev,
                        "quantize": [{"method": "rtn", "group_size": 32}], "fidelity": {"tokens": 256}})
    ctx = RunContext(cfg, tmp_path / "s", tmp_path, Store(":memory:"), shared_data, "cpu", Console(quiet=True))
    return {(s.stage, s.model): s.key for s in plan(ctx)}


def test_speed_prompts_rekey_only_the_measure_stages(tmp_path, shared_data):
    before = _keys(tmp_path, shared_data)
    after = _keys(tmp_path, shared_data, speed={"prompts": 6, "max_new_tokens": 8})
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {k for k in before if k[0] == "measure"} and changed


def test_evaluation_settings_do_not_rekey_fidelity(tmp_path, shared_data):
    before = _keys(tmp_path, shared_data)
    after = _keys(tmp_path, shared_data, tasks=[{"name": "arc_easy", "limit": 16}], batch_size=4)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {k for k in before if k[0] == "evaluate"} and changed


def test_stages_done_under_pre_18_keys_are_rekeyed_not_rerun(tmp_path, shared_data):
    """A study made before keys moved next to their stage recomputes nothing: its evaluate and
    fidelity stages, done under the old formulas, are re-keyed once and then count as cached."""
    from rich.console import Console

    from quantstudy.config import parse_config
    from quantstudy.runtime.context import RunContext
    from quantstudy.study import execute, plan

    make_tiny_model(tmp_path / "tiny", hidden=64)
    cfg = parse_config({"name": "k", "model": {"source": str(tmp_path / "tiny")},
                        "evaluate": {"tasks": [{"name": "arc_easy", "limit": 8}], "speed": None},
                        "quantize": [{"method": "rtn", "group_size": 32}], "fidelity": {"tokens": 256}})
    with Store(tmp_path / "s.sqlite") as store:
        ctx = RunContext(cfg, tmp_path / "s", tmp_path, store, shared_data, "cpu", Console(quiet=True))
        steps = plan(ctx)
        for s in steps:  # what a pre-#18 run left: every stage done, evaluate/fidelity under their old keys
            key = s.legacy_key or s.key
            store.stage_start(key, s.stage, s.model)
            store.stage_finish(key)
        assert all(s.cached for s in plan(ctx))
        ran = []
        execute(ctx, plan(ctx), lambda s: ran.append(s) or True)  # `wanted` sees every stage; none is run
        assert all(s.seconds is None for s in ran)
        assert all(store.stage_done(s.key) is not None for s in plan(ctx))
        assert not any(store.stage_done(s.legacy_key) for s in steps if s.legacy_key not in (None, s.key))
        assert any(s.legacy_key not in (None, s.key) for s in steps)  # fidelity: its old key hashed `evaluate`
