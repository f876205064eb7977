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
    """A re-made model (new weights) loses what was computed on the old weights, but not what the
    stage that re-made it recorded: loss curve, training and quantization metrics, per-layer errors
    and calibration samples. (The study writes those first, then notices the new weights hash.)"""
    from quantstudy.store import ItemRecord

    with Store(study.parent / "out" / "remade.sqlite") as s:
        s.put_series("trained", "loss", [(1, 1.0), (2, 0.9), (3, 0.8)])
        s.put_series("trained", "loss", [(1, 0.7), (2, 0.6)])  # a series is written whole
        s.put_metric("trained", "train.seconds", 12.0)
        s.put_metric("q", "quantize.seconds", 3.0)
        s.put_layers("q", [("l0", 1.0, 0.1), ("l1", 2.0, 0.1)])
        s.put_layers("q", [("l0", 0.5, 0.1)])
        s.put_calibration("q", [("s0", "h0")])
        for m in ("trained", "q"):
            s.put_metric(m, "speed.latency_s", 0.5)
            s.put_series(m, "fidelity.kl", [(0, 0.1)])
            s.put_items(m, [ItemRecord("arc_easy", "1", "h", "p", "A", "A", True)])
            s.forget_results(m)
        assert s.series("trained", "loss") == [(1, 0.7), (2, 0.6)]
        assert s.layers("q") == [("l0", 0.5, 0.1)] and s.calibration("q") == [("s0", "h0")]
        kept = {(m, n) for m, n, _, _ in s.metrics()}
        assert kept == {("trained", "train.seconds"), ("q", "quantize.seconds")}
        assert all(not s.series(m, "fidelity.kl") for m in ("trained", "q"))
        assert not s.db.execute("SELECT count(*) FROM items").fetchone()[0]
