"""The console shows progress and one line per stage; the libraries' output goes, complete, to the
study's logs/<stage>-<model>.log. Run as a user runs it: the real CLI in a subprocess, its output
piped to a file (not a terminal), so the fd-level redirection is what is tested."""

from __future__ import annotations

import io
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from quantstudy.runtime import progress
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("console")
    make_tiny_model(r / "tiny")
    (r / "calib.jsonl").write_text("\n".join('{"text": "the cat sat on a mat while %d dogs ran"}' % i
                                             for i in range(8)))
    (r / "fid.txt").write_text(" ".join(["the cat sat on a mat while two dogs ran past"] * 60))
    return r


def write_study(root: Path, name: str) -> Path:
    cfg = {"name": name, "output_dir": f"out-{name}", "model": {"source": "tiny"},
           "calibration": {"source": "jsonl", "path": "calib.jsonl", "samples": 4, "max_seq_len": 32},
           "quantize": [{"method": "gptq", "group_size": 32}], "evaluate": None,
           "fidelity": {"source": "fid.txt", "tokens": 256, "context_length": 64, "top_k": 8}}
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed entry point, stdout and stderr into one pipe, as `quantstudy ... 2>&1 | tee` sees it."""
    exe = Path(sys.executable).with_name("quantstudy")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUANTSTUDY_PROGRESS_SECONDS": "30"}
    return subprocess.run([str(exe), *args], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)


def test_piped_run_is_quiet_and_logs_are_complete(root):
    r = cli(root, "run", str(write_study(root, "quiet")), "--format", "json")
    assert r.returncode == 0, r.stdout
    out = r.stdout
    # nothing of the libraries on the console: no loguru lines, no tqdm bars, no warnings
    for noise in ("METRIC", "No accelerator", "it/s]", "Warning", "| INFO |"):
        assert noise not in out, f"{noise!r} on the console:\n{out}"
    lines = out.splitlines()
    assert len(lines) <= 15, out
    assert any("quantize gptq-w4g32-c4 done" in ln and "mean layer error" in ln for ln in lines), out
    assert any("fidelity gptq-w4g32-c4 done" in ln and "mean KL" in ln for ln in lines), out
    logs = root / "out-quiet" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["fidelity-gptq-w4g32-c4.log", "quantize-gptq-w4g32-c4.log",
                                                      "resolve-base.log"]
    log = (logs / "quantize-gptq-w4g32-c4.log").read_text()
    # complete: llm-compressor's per-layer METRIC error lines, one per quantized Linear (the store's layer table
    # is filled from the same loguru records by another sink, so the counts must agree)
    n_layers = sqlite3.connect(root / "out-quiet" / "store.sqlite").execute(
        "SELECT count(*) FROM layers WHERE model='gptq-w4g32-c4' AND error IS NOT NULL").fetchone()[0]
    assert n_layers == 14  # 2 decoder layers x 7 Linear
    assert len(re.findall(r"\| METRIC [-|] error ", log)) == n_layers
    assert "Calibrating" in log  # llm-compressor's tqdm bar, written to stderr


def test_verbose_shows_library_output_live_and_still_logs(root):
    r = cli(root, "quantize", str(write_study(root, "loud")), "--verbose")
    assert r.returncode == 0, r.stdout
    assert re.search(r"\| METRIC [-|] error ", r.stdout)  # live
    assert re.search(r"\| METRIC [-|] error ", (root / "out-loud" / "logs" / "quantize-gptq-w4g32-c4.log").read_text())


def test_plain_progress_rate_and_eta(monkeypatch):
    """Off a terminal: a line at most every PLAIN_EVERY_S seconds; the ETA is this run's rate extrapolated."""
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 30.0)
    monkeypatch.setattr(progress, "_last_line", [0.0])
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=False, width=200)
    with progress.make_progress(con) as p:
        assert isinstance(p, progress.PlainProgress)
        bar = p.add_task("m · task", total=100, completed=20)  # 20 done by an earlier (resumed) run
        for _ in range(80):  # one item per second: 80 s
            now[0] += 1
            p.advance(bar, 1)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2  # at 30 s and 60 s
    # at 30 s: 50/100, rate 30 items / 30 s = 1/s, 50 left -> 50 s
    assert lines[0] == "  m · task: 50/100 (50%), 30 s, ~50 s left"
    assert lines[1] == "  m · task: 80/100 (80%), 60 s, ~20 s left"


def test_terminal_gets_rich_bars():
    con = Console(file=io.StringIO(), force_terminal=True)
    assert not isinstance(progress.make_progress(con), progress.PlainProgress)


def test_quantize_shows_calibration_progress_per_layer(root):
    """GPTQ's calibration gets a bar over its subgraphs (one per decoder layer, plus the head's): with a
    progress line per update, the last one reads total/total, so the total matches what llm-compressor
    calibrates."""
    import json

    exe = Path(sys.executable).with_name("quantstudy")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUANTSTUDY_PROGRESS_SECONDS": "0"}
    r = subprocess.run([str(exe), "quantize", str(write_study(root, "calprog"))], cwd=root, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout
    layers = json.loads((root / "tiny" / "config.json").read_text())["num_hidden_layers"]
    seen = re.findall(r"calibrated layers: (\d+)/(\d+)", r.stdout)
    assert seen, r.stdout
    assert [int(d) for d, _ in seen] == list(range(1, layers + 2)), r.stdout
    assert {int(t) for _, t in seen} == {layers + 1}


def test_headline_names_an_lmeval_tasks_own_metric():
    """lm-eval tasks name their metrics themselves ("exact_match,strict-match"): the finish line shows the
    first one rather than the bare task name."""
    m = {"eval.gsm8k.exact_match,strict-match": 0.05, "eval.gsm8k.n": 20.0, "eval.arc_easy.acc": 0.5,
         "eval.arc_easy.n": 40.0}
    assert progress._task_headline(m, "gsm8k") == "gsm8k exact_match,strict-match 0.05 (n=20)"
    assert progress._task_headline(m, "arc_easy") == "arc_easy acc 0.5 (n=40)"
