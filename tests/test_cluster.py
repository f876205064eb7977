"""The Ray executor (#19) on a 2-node cluster in this process (ray.cluster_utils.Cluster):
the store it leaves equals the in-process executor's, a worker killed mid-stage is retried to
the same store, a node removed mid-evaluate and a killed driver end in the same store too, a
stage that fails leaves the independent ones done and the run non-zero, and a stage that asks
for a (fake) GPU runs on the node that has one."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from quantstudy.cli import app
from tests.tiny import make_tiny_model

ray = pytest.importorskip("ray")
runner = CliRunner()


def _study(root: Path, shared_data: Path, name: str, **extra) -> Path:
    if not (root / "tiny").is_dir():
        make_tiny_model(root / "tiny", hidden=64)
    cfg = {"name": name, "output_dir": f"out-{name}", "data_dir": str(shared_data), "model": {"source": "tiny"},
           "quantize": [{"method": "rtn", "group_size": [32, 64]}],
           "evaluate": {"tasks": [{"name": "arc_easy", "limit": 8}, {"name": "wikitext", "limit": 2}], "speed": None,
                        "batch_size": 4},
           "fidelity": {"tokens": 256, "context_length": 64, "top_k": 16}, **extra}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _content(study: Path) -> dict:
    """What a study computed, without timings and paths: weights, items, metrics."""
    db = sqlite3.connect(study.parent / f"out-{yaml.safe_load(study.read_text())['name']}" / "store.sqlite")
    skip = ("time.", "quantize.seconds", "quantize.peak_rss")
    return {
        "models": sorted(db.execute("SELECT name, role, parent, weights_hash FROM models")),
        "items": sorted((m, t, i, p, c, round(s, 4) if s is not None else None)
                        for m, t, i, p, c, s in db.execute("SELECT model, task, item_id, prediction, correct, score FROM items")),
        "metrics": sorted((m, n, round(v, 4) if v is not None else None) for m, n, v in
                          db.execute("SELECT model, name, value FROM metrics") if not n.startswith(skip)),
        "done": sorted(db.execute("SELECT stage, model FROM stages WHERE status='done'")),
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two 1-CPU nodes. Their workers inherit a fail point: the first attempt at saving a quantized
    model, anywhere on the cluster, SIGKILLs its worker (the marker file says it happened)."""
    import os

    from ray.cluster_utils import Cluster

    marker = tmp_path_factory.mktemp("fault") / "killed-once"
    os.environ.update(QS_FAILPOINT="save-model", QS_FAILPOINT_ONCE=str(marker))
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
    finally:  # this process (the driver, the in-process runs) must not die at the fail point
        del os.environ["QS_FAILPOINT"], os.environ["QS_FAILPOINT_ONCE"]
    c.marker = marker
    yield c
    ray.shutdown()
    c.shutdown()


def test_cluster_run_equals_in_process_run_even_with_a_killed_worker(tmp_path, shared_data, cluster):
    local = _study(tmp_path, shared_data, "local")
    r = runner.invoke(app, ["run", str(local), "--format", "json"])
    assert r.exit_code == 0, r.output
    # 4 tasks per worker: each model's arc_easy (8 items, batch 4) is cut into 2 parts of 4 items
    remote = _study(tmp_path, shared_data, "remote", cluster={"tasks_per_worker": 4})
    r = runner.invoke(app, ["run", str(remote), "--format", "json", "--ray-address", cluster.address])
    assert r.exit_code == 0, r.output
    assert cluster.marker.exists()  # a worker was killed while saving a model; Ray's retry got through
    logs = {p.name for p in (tmp_path / "out-remote" / "logs").iterdir()}
    assert {"evaluate-rtn-w4g32-arc_easy-1of2.log", "evaluate-rtn-w4g32-arc_easy-2of2.log",
            "evaluate-rtn-w4g32-wikitext.log"} <= logs
    a, b = _content(local), _content(remote)
    assert a == b  # the parts' items and the figures aggregated from them equal the whole task's
    db = sqlite3.connect(tmp_path / "out-remote" / "store.sqlite")
    cut = [json.loads(i) for (i,) in db.execute("SELECT info FROM metrics WHERE name='time.eval.arc_easy'")]
    assert len(cut) == 3 and all(c["parts"] == 2 and c["items_scored"] == 8 for c in cut)  # the parts' times, summed
    assert len(a["done"]) == 1 + 2 + 3 + 2  # resolve, 2 quantize, 3 evaluate, 2 fidelity
    infos = [i for (i,) in db.execute("SELECT info FROM stages WHERE stage='quantize'")]
    assert all('"node"' in i and '"versions"' in i for i in infos)  # where each result was computed
    assert not list((tmp_path / "out-remote" / "models").glob("*.tmp"))  # the killed attempt's folder is gone


def _broken(root: Path) -> Path:
    (root / "broken.jsonl").write_text('{"messages": [unterminated\n')
    return root / "broken.jsonl"


def test_a_failing_stage_fails_only_what_depends_on_it(tmp_path, shared_data, cluster):
    # its calibration file is not JSON: that quantize stage raises on the worker
    study = _study(tmp_path, shared_data, "fail", quantize=[{"method": "rtn", "group_size": 32},
                                                            {"method": "gptq", "group_size": 32,
                                                             "calibration": {"source": "jsonl",
                                                                             "path": str(_broken(tmp_path))}}])
    r = runner.invoke(app, ["run", str(study), "--format", "json", "--ray-address", cluster.address])
    assert r.exit_code == 2, r.output
    assert "quantize gptq" in r.output and "failed" in r.output
    db = sqlite3.connect(tmp_path / "out-fail" / "store.sqlite")
    done = set(db.execute("SELECT stage, model FROM stages WHERE status='done'"))
    assert ("evaluate", "rtn-w4g32") in done and ("fidelity", "rtn-w4g32") in done  # independent stages ran
    assert not any(m.startswith("gptq") for _, m in done)


def test_a_stage_no_node_can_run_is_refused_at_start(tmp_path, shared_data, cluster):
    study = _study(tmp_path, shared_data, "gpu", cluster={"quantize": {"num_gpus": 1}})
    r = runner.invoke(app, ["run", str(study), "--format", "json", "--ray-address", cluster.address])
    assert r.exit_code == 2, r.output
    assert "no node of the cluster can run the quantize stage" in r.output and "GPU 1" in r.output
    assert "cluster.quantize" in r.output


def _info(study_out: Path, stage: str) -> list[dict]:
    db = sqlite3.connect(study_out / "store.sqlite")
    return [json.loads(i) for (i,) in db.execute("SELECT info FROM stages WHERE stage=? AND status='done'", (stage,))]


@pytest.mark.slow  # ~25-45 s each on 2 cores; CI runs the equality test above
def test_a_stage_that_asks_for_a_gpu_runs_where_one_is(tmp_path, shared_data, cluster):
    """A third node declares one (fake) GPU: quantize asks for it and gets it (Ray hands the task
    GPU id 0 on that node); evaluate asks for none and gets none."""
    gpu = cluster.add_node(num_cpus=1, num_gpus=1)
    try:
        cluster.wait_for_nodes()
        study = _study(tmp_path, shared_data, "gpu-ok", cluster={"quantize": {"num_gpus": 1}})
        r = runner.invoke(app, ["run", str(study), "--format", "json", "--ray-address", cluster.address])
        assert r.exit_code == 0, r.output
        quantize, evaluate = _info(tmp_path / "out-gpu-ok", "quantize"), _info(tmp_path / "out-gpu-ok", "evaluate")
        assert len(quantize) == 2 and len(evaluate) == 3
        placed = [(q["hardware"]["gpu_ids"], q["hardware"]["ray_node_id"]) for q in quantize]
        assert placed == [(["0"], gpu.node_id)] * 2, (placed, gpu.unique_id)
        assert all(e["hardware"]["gpu_ids"] == [] for e in evaluate)
    finally:
        cluster.remove_node(gpu)


@pytest.mark.slow  # ~25-45 s each on 2 cores; CI runs the equality test above
def test_a_node_removed_mid_evaluate_ends_in_the_same_store(tmp_path, shared_data, cluster):
    """Evaluation runs only on nodes with the custom resource `ev`. The first one holds its task
    after the first stored batch (a pausing fail point); then a second `ev` node joins and the
    first is removed (its raylet and workers killed): Ray re-runs the task on the second, and the
    store equals the in-process run's."""
    local = _study(tmp_path, shared_data, "node-local")
    assert runner.invoke(app, ["run", str(local), "--format", "json"]).exit_code == 0
    marker = tmp_path / "paused"
    os.environ.update(QS_FAILPOINT="evaluate-mid", QS_FAILPOINT_ONCE=str(marker), QS_FAILPOINT_PAUSE="1")
    try:
        first = cluster.add_node(num_cpus=1, resources={"ev": 1})
    finally:
        for k in ("QS_FAILPOINT", "QS_FAILPOINT_ONCE", "QS_FAILPOINT_PAUSE"):
            del os.environ[k]
    cluster.wait_for_nodes()
    study = _study(tmp_path, shared_data, "node", cluster={"evaluate": {"resources": {"ev": 1}}})
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(_command(study, cluster), stdout=log.open("w"), stderr=subprocess.STDOUT, env=_clean_env())
    second = None
    try:  # Ray starts nodes from the main thread only (signal handlers), so the driver is a process
        deadline = time.time() + 300
        while not (marker.exists() and marker.read_text()) and time.time() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert marker.exists() and marker.read_text(), "no evaluate task reached the pausing fail point"
        second = cluster.add_node(num_cpus=1, resources={"ev": 1})
        cluster.remove_node(first, allow_graceful=False)
        first = None
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
        assert _content(local) == _content(study)
        # every evaluate stage finished on the second node (the paused one was re-run there)
        assert {e["hardware"]["ray_node_id"] for e in _info(tmp_path / "out-node", "evaluate")} == {second.node_id}
    finally:
        driver.kill()
        for n in (first, second):
            if n is not None:
                cluster.remove_node(n, allow_graceful=False)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("QS_FAILPOINT")}


def _command(study: Path, cluster) -> list[str]:
    return [sys.executable, "-m", "quantstudy.cli", "run", str(study), "--format", "json", "--ray-address",
            cluster.address]


@pytest.mark.slow  # ~25-45 s each on 2 cores; CI runs the equality test above
def test_a_killed_driver_loses_at_most_the_batch_in_flight(tmp_path, shared_data, cluster):
    """The driver SIGKILLs itself right after storing its first item batch; a second `run` resumes:
    it scores only the items not stored, and the store equals the in-process run's."""
    local = _study(tmp_path, shared_data, "drv-local")
    assert runner.invoke(app, ["run", str(local), "--format", "json"]).exit_code == 0
    study = _study(tmp_path, shared_data, "drv")
    cmd, env = _command(study, cluster), _clean_env()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "QS_FAILPOINT": "driver-items"})
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    db = sqlite3.connect(tmp_path / "out-drv" / "store.sqlite")
    kept = db.execute("SELECT count(*) FROM items").fetchone()[0]
    assert kept >= 1  # the batch written before the kill
    db.close()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert _content(local) == _content(study)
    db = sqlite3.connect(tmp_path / "out-drv" / "store.sqlite")
    rescored = sum(n for (n,) in db.execute(
        "SELECT json_extract(info, '$.items_scored') FROM metrics WHERE name LIKE 'time.eval.%'"))
    total = db.execute("SELECT count(*) FROM items").fetchone()[0]
    assert rescored == total - kept  # nothing stored before the kill was scored again
