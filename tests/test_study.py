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
    from quantstudy.lock import study_lock

    out_dir = study.parent / "out"
    out_dir.mkdir(exist_ok=True)
    with study_lock(out_dir):
        import subprocess
        import sys

        r = subprocess.run([sys.executable, "-m", "quantstudy.cli", "quantize", str(study)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "is in use by pid" in r.stdout and "Traceback" not in r.stdout + r.stderr
