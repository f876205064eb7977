"""Bad input gets one clear message (what, value, fix), a non-zero exit, no traceback, and
loses nothing already computed. Each case runs the real CLI on a real (tiny) study."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from quantstudy.cli import app
from tests.tiny import make_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("bad")
    make_tiny_model(r / "tiny", hidden=96, intermediate=192)  # 96 is not a multiple of 64
    (r / "noweights").mkdir()
    (r / "noweights" / "config.json").write_text((r / "tiny" / "config.json").read_text())
    (r / "five.jsonl").write_text("\n".join(json.dumps({"text": f"sample {i}"}) for i in range(5)))
    (r / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (r / "emptydata").mkdir()
    return r


def study(root: Path, case: str, **over) -> Path:
    cfg = {"name": "bad", "output_dir": f"out-{case}", "model": {"source": "tiny"},
           "calibration": {"samples": 4, "max_seq_len": 32},
           "quantize": [{"method": "rtn", "group_size": 32}], "evaluate": None}
    for k, v in over.items():
        if v is None and k in cfg and k != "evaluate":
            cfg.pop(k)
        else:
            cfg[k] = v
    p = root / f"{case}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def run_cli(*args: str, env: dict[str, str] | None = None):
    r = runner.invoke(app, list(args), env=env)
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.output


def gguf_of_unknown_arch(path: Path) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "bogusarch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# (case id, study overrides or a callable making the argv, expected words in the message)
CASES = [
    ("typo-top", dict(quantise=[]), ["quantise", "did you mean `quantize`"]),
    ("typo-nested", dict(calibration={"samples": 4, "max_seq_lenn": 32}), ["calibration.max_seq_lenn", "max_seq_len"]),
    ("wrong-type", dict(seed="zero"), ["seed", "'zero'"]),
    ("bad-method", dict(quantize=[{"method": "gtpq"}]), ["quantize[0].method", "gptq"]),
    ("bad-bits", dict(quantize=[{"method": "rtn", "bits": 2}]), ["bits", "3, 4 or 8"]),
    ("bad-group", dict(quantize=[{"method": "rtn", "group_size": 48}]), ["group_size", "32, 64, 128"]),
    ("group-not-dividing", dict(quantize=[{"method": "rtn", "group_size": 64}]), ["group_size 64", "[96]", "32"]),
    ("too-many-calib", dict(calibration={"source": "jsonl", "path": "five.jsonl", "samples": 9},
                            quantize=[{"method": "gptq", "group_size": 32}]), ["9", "only 5"]),
    ("missing-data-file", dict(data_dir="emptydata", quantize=[{"method": "gptq", "group_size": 32}]),
     ["sharegpt", "emptydata", "Fix"]),
    ("malformed-data", dict(calibration={"source": "jsonl", "path": "broken.jsonl", "samples": 1},
                            quantize=[{"method": "gptq", "group_size": 32}]), ["broken.jsonl", "not valid JSON"]),
    ("missing-jsonl", dict(calibration={"source": "jsonl", "path": "nope.jsonl", "samples": 1},
                           quantize=[{"method": "gptq", "group_size": 32}]), ["nope.jsonl", "not found"]),
    ("jsonl-without-path", dict(calibration={"source": "jsonl"}), ["needs `path:`"]),
    ("unknown-task", dict(evaluate={"tasks": ["arc_eazy"]}), ["arc_eazy", "arc_easy"]),
    ("task-twice", dict(evaluate={"tasks": ["arc_easy", "arc_easy"], "speed": None}), ["listed twice"]),
    ("no-weights", dict(model={"source": "noweights"}), ["no weight files", "noweights"]),
    ("no-model-dir", dict(model={"source": "./nothing-here"}), ["does not exist", "nothing-here"]),
    ("gguf-missing", dict(model={"source": "missing.gguf"}), ["GGUF file not found", "missing.gguf"]),
    ("nonsense-source", dict(model={"source": "not a model"}), ["model.source", "hub id"]),
    ("missing-model", dict(model=None), ["model", "required field is missing"]),
    ("cuda-on-cpu", dict(device="cuda"), ["CUDA", "device: cpu"]),
    ("data-dir-missing", dict(data_dir="no/such/dir"), ["data directory not found", "no/such/dir"]),
    ("dup-variants", dict(quantize=[{"method": "rtn", "group_size": 32}, {"method": "rtn", "group_size": 32}]),
     ["same variant", "rtn-w4g32"]),
    ("name-on-expanding", dict(quantize=[{"method": ["rtn", "gptq"], "group_size": 32, "name": "x"}]),
     ["explicit `name`"]),
    ("unsafe-variant-name", dict(quantize=[{"method": "rtn", "group_size": 32, "name": "../../etc"}]),
     ["names a folder"]),
    ("unsafe-study-name", dict(name="../x"), ["study name"]),
    ("train-calib-without-train", dict(calibration={"source": "train", "samples": 2},
                                       quantize=[{"method": "gptq", "group_size": 32}]), ["needs a `train:` section"]),
    ("negative-limit", dict(evaluate={"tasks": ["arc_easy"], "limit": -3}), ["evaluate.limit", "-3"]),
    ("lr-zero", dict(train={"learning_rate": 0}), ["train.learning_rate"]),
]


@pytest.mark.parametrize("case, over, words", CASES, ids=[c[0] for c in CASES])
def test_bad_config(root, case, over, words, monkeypatch):
    monkeypatch.chdir(root)
    out = run_cli("run", str(study(root, case, **over)))
    flat = " ".join(out.split())
    for w in words:
        assert w in flat, f"{case}: {w!r} not in {flat!r}"
    assert "Fix" in flat or "fix" in flat


def test_unreachable_hub_id_while_offline(root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(root / "empty-hf-home"))
    out = " ".join(run_cli("run", str(study(root, "hub", model={"source": "nobody/no-such-model"}))).split())
    assert "HF_HUB_OFFLINE is set" in out and "nobody/no-such-model" in out


def test_gguf_of_unsupported_architecture(root):
    g = gguf_of_unknown_arch(root / "bogus.gguf")
    out = " ".join(run_cli("run", str(study(root, "gguf", model={"source": str(g)}))).split())
    assert "bogus.gguf" in out and "architecture" in out


def test_study_from_incompatible_version(root):
    p = study(root, "oldstore")
    (root / "out-oldstore").mkdir(exist_ok=True)
    db = sqlite3.connect(root / "out-oldstore" / "store.sqlite")
    db.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES('schema_version', '999')")
    db.commit()
    db.close()
    out = " ".join(run_cli("run", str(p)).split())
    assert "incompatible" in out and "schema 999" in out


@pytest.mark.parametrize("argv, words", [
    (["run", "no-such-study.yaml"], ["study file not found"]),
    (["report", "."], ["no study store here"]),
    (["run", "list.yaml"], ["YAML mapping"]),
    (["run", "syntax.yaml"], ["not valid YAML"]),
    (["run", "pyobj.yaml"], ["not valid YAML"]),
    (["run", "ok.yaml", "--format", "pdf"], ["pdf"]),
    (["run", "ok.yaml", "--data-dir", "nowhere"], ["--data-dir", "nowhere"]),
    (["evaluate", "ok.yaml", "--model", "ghost"], ["--model", "ghost", "base"]),
])
def test_bad_command_lines(root, monkeypatch, argv, words):
    monkeypatch.chdir(root)
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "syntax.yaml").write_text("name: [unclosed\n")
    (root / "pyobj.yaml").write_text("name: !!python/object/apply:os.system ['true']\n")
    study(root, "ok")
    out = " ".join(run_cli(*argv).split())
    for w in words:
        assert w in out, out


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB filesystem (tmpfs) that the test can fill; skipped where mount is not allowed."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_finished_work(root, small_disk):
    """The report hits a full disk: one clear error, the store and models stay intact, and the
    same command succeeds once space is freed."""
    p = study(root, "disk", output_dir=str(small_disk / "study"))
    assert runner.invoke(app, ["quantize", str(p)]).exit_code == 0
    out_dir = small_disk / "study"
    count = "SELECT count(*) FROM models"
    before = sqlite3.connect(out_dir / "store.sqlite").execute(count).fetchone()[0]
    assert before == 2
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    out = " ".join(run_cli("report", str(out_dir), "--format", "json").split())
    assert "No space left on device" in out and "free disk space" in out
    assert not list(out_dir.glob("*.tmp")) and not (out_dir / "results.json").exists()
    filler.unlink()
    assert sqlite3.connect(out_dir / "store.sqlite").execute(count).fetchone()[0] == before
    assert runner.invoke(app, ["report", str(out_dir), "--format", "json"]).exit_code == 0
    assert (out_dir / "results.json").is_file()
