"""How the Ray executor cuts evaluation into tasks (#19), without a cluster: bundles of roughly
equal item counts, at least `tasks_per_worker` x workers of them for a large study, each a
contiguous run of a task's prompt-sorted items, and parts that together score every item once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from quantstudy.config.load import parse_config
from quantstudy.errors import QuantStudyError
from quantstudy.runtime import environment
from quantstudy.runtime.cluster import _worker
from quantstudy.runtime.cluster_plan import check_resources, evaluate_parts, slots
from quantstudy.stages.evaluate import shard_of


def _cfg(tasks: list[dict], batch_size: int = 8, cluster: dict | None = None):
    data = {"name": "plan", "model": {"source": "x"}, "quantize": [{"method": "rtn"}],
            "evaluate": {"tasks": tasks, "batch_size": batch_size, "speed": None}}
    if cluster is not None:
        data["cluster"] = cluster
    return parse_config(data)


def test_a_large_study_gives_at_least_twice_as_many_evaluate_tasks_as_workers(shared_data):
    cfg = _cfg([{"name": "arc_easy", "limit": 400}, {"name": "mmlu", "limit": 1000}, {"name": "wikitext", "limit": 2}])
    models, workers = 3, 8
    parts = evaluate_parts(cfg, shared_data, models, workers)
    assert models * len(parts) >= 2 * workers
    n = {k: sum(1 for key, _ in parts if key == k) for k, _ in parts}
    assert n["mmlu"] > n["arc_easy"] > 1  # the bigger task is cut into more parts
    assert n["wikitext"] == 1  # 2 documents: less than one batch, kept whole
    for key, count in n.items():  # every part names the same count, and the parts are 0..n-1
        got = sorted(p for k, p in parts if k == key)
        assert got == ([None] if count == 1 else [(i, count) for i in range(count)])


def test_a_small_study_on_a_small_cluster_keeps_each_task_whole(shared_data):
    cfg = _cfg([{"name": "arc_easy", "limit": 40}, {"name": "hellaswag", "limit": 40}])
    assert evaluate_parts(cfg, shared_data, models=3, workers=2) == [("arc_easy", None), ("hellaswag", None)]
    more = _cfg([{"name": "arc_easy", "limit": 40}, {"name": "hellaswag", "limit": 40}],
                cluster={"tasks_per_worker": 12})  # asks for 24 tasks of 3 models: each task in parts
    parts = evaluate_parts(more, shared_data, models=3, workers=2)
    assert 3 * len(parts) >= 24 and all(p is not None for _, p in parts)


def test_parts_are_contiguous_and_cover_every_item_once():
    prompts = [f"prompt {i:03d}" for i in range(103)]
    for n in (1, 2, 7, 103):
        cut = [shard_of(prompts, (i, n)) for i in range(n)]
        assert [p for part in cut for p in part] == prompts  # in order, nothing twice, nothing left out
        assert max(map(len, cut)) - min(map(len, cut)) <= 1
    assert shard_of(prompts, None) == prompts


def test_slots_count_each_nodes_scarcest_resource():
    nodes = [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 4.0}, {"CPU": 8.0, "GPU": 1.0, "h100": 1.0}]
    res = SimpleNamespace(num_cpus=2, num_gpus=1, memory=None, resources={})
    assert slots(nodes, res) == 2 + 0 + 1
    assert slots(nodes, SimpleNamespace(num_cpus=2, num_gpus=0, memory=None, resources={})) == 8 + 2 + 4
    pinned = SimpleNamespace(num_cpus=1, num_gpus=0, memory=None, resources={"h100": 1})
    assert slots(nodes, pinned) == 1
    check_resources(nodes, SimpleNamespace(quantize=pinned), {"quantize"})  # fits the third node


def test_a_worker_with_other_library_versions_refuses_before_any_work(tmp_path):
    driver = {**environment.versions(), "torch": "0.0.1"}
    with pytest.raises(QuantStudyError) as e:
        next(_worker(None, driver, 1, str(tmp_path / "log")))  # the job is never read
    assert "torch 0.0.1 (driver) vs" in str(e.value) and "driver's versions" in e.value.fix
