"""The Ray executor (#19) on a 2-node cluster in this process (ray.cluster_utils.Cluster):
the store it leaves equals the in-process executor's, a worker killed mid-stage is retried to
the same store, and a stage that fails leaves the independent ones done and the run non-zero."""

from __future__ import annotations

import sqlite3
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
    remote = _study(tmp_path, shared_data, "remote")
    r = runner.invoke(app, ["run", str(remote), "--format", "json", "--ray-address", cluster.address])
    assert r.exit_code == 0, r.output
    assert cluster.marker.exists()  # a worker was killed while saving a model; Ray's retry got through
    a, b = _content(local), _content(remote)
    assert a == b
    assert len(a["done"]) == 1 + 2 + 3 + 2  # resolve, 2 quantize, 3 evaluate, 2 fidelity
    db = sqlite3.connect(tmp_path / "out-remote" / "store.sqlite")
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
