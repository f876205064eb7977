"""The Ray executor's cost: a 4-variant tiny study in process vs on a local 2-node Ray cluster.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/cluster_overhead.py [--nodes 2] [--cpus-per-node 1]

Both runs make the same study from scratch (a tiny random Llama, 4 RTN/GPTQ variants, ARC-Easy x 16
and WikiText x 2 per model, fidelity on 256 tokens; no speed stage) into fresh directories, through
the CLI (`quantstudy run`, `quantstudy run --ray-address`). The cluster is `ray.cluster_utils.Cluster`
(2 raylets in this machine's process tree, one CPU each), started before the clock. Ray's overhead
per task: the round trip of an empty streaming-generator task (submit, schedule, one yield, end),
median of 20, on the same cluster. Prints the load average beside every timing: on this 2-core box
a concurrent job changes everything.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def study(root: Path, name: str, data: Path) -> Path:
    cfg = {"name": name, "output_dir": f"out-{name}", "data_dir": str(data), "model": {"source": "tiny"},
           "calibration": {"source": "sharegpt", "samples": 8, "max_seq_len": 64},
           "quantize": [{"method": ["rtn", "gptq"], "group_size": [32, 64]}],
           "evaluate": {"tasks": [{"name": "arc_easy", "limit": 16}, {"name": "wikitext", "limit": 2}],
                        "speed": None, "batch_size": 4},
           "fidelity": {"tokens": 256, "context_length": 64, "top_k": 16}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return root / f"{name}.yaml"


def timed_run(args: list[str]) -> float:
    from typer.testing import CliRunner

    from quantstudy.cli import app

    t0 = time.perf_counter()
    r = CliRunner().invoke(app, args)
    if r.exit_code != 0:
        raise SystemExit(r.output)
    return time.perf_counter() - t0


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    a = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    from tests.tiny import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="qs-cluster-bench-"))
    make_tiny_model(root / "tiny", hidden=64)
    print(f"before: {load()}", flush=True)
    local = timed_run(["run", str(study(root, "local", Path(a.data_dir))), "--format", "json"])
    print(f"in process: {local:.1f} s ({load()})", flush=True)
    t0 = time.perf_counter()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": a.cpus_per_node, "include_dashboard": False})
    for _ in range(a.nodes - 1):
        c.add_node(num_cpus=a.cpus_per_node)
    c.wait_for_nodes()
    print(f"cluster of {a.nodes} nodes x {a.cpus_per_node} CPU up in {time.perf_counter() - t0:.1f} s ({load()})",
          flush=True)
    try:
        remote = timed_run(["run", str(study(root, "ray", Path(a.data_dir))), "--format", "json",
                            "--ray-address", c.address])
        print(f"on the cluster: {remote:.1f} s ({load()})", flush=True)

        @ray.remote(num_cpus=1, num_returns="streaming")
        def empty():
            yield 0

        trips = []
        for _ in range(20):
            t1 = time.perf_counter()
            for ref in empty.remote():
                ray.get(ref)
            trips.append(time.perf_counter() - t1)
        print(f"Ray round trip of an empty streaming task: median {statistics.median(trips) * 1e3:.1f} ms, "
              f"max {max(trips) * 1e3:.1f} ms over 20 ({load()})", flush=True)
    finally:
        ray.shutdown()
        c.shutdown()
    print(f"stages: 1 resolve + 4 quantize + 5x2 evaluate tasks + 4 fidelity; cluster / in process = "
          f"{remote / local:.2f}x")


if __name__ == "__main__":
    main()
