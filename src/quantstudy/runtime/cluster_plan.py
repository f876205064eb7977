"""What a Ray cluster can run and how a study's work is cut into tasks (no Ray calls but `nodes`).

  - `check_resources`: each stage kind must fit on some live node, or Ray would queue it forever;
  - `evaluate_parts`: evaluation is cut into bundles of roughly equal item counts, so a large study
    gives at least `cluster.tasks_per_worker` (default 2) times as many tasks as evaluation workers
    and no worker sits idle behind one long task; a bundle is a contiguous run of a task's
    prompt-sorted items (the fast scorer's order), so it keeps its shared prefixes;
  - `waves`: for `plan`, the rounds in which stages could run at the same time.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from quantstudy.errors import QuantStudyError

MAKE = ("resolve", "train", "quantize")


def needs(res: Any) -> dict[str, float]:
    """What one task of a stage asks of a node, in Ray's resource names."""
    need = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}
    if res.memory:
        need["memory"] = res.memory
    return {k: v for k, v in need.items() if v}


def alive(ray: Any) -> list[dict[str, float]]:
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def check_resources(nodes: list[dict[str, float]], ccfg: Any, stages: set[str]) -> None:
    """Each stage kind must fit on some live node, or it would wait forever: say so now instead."""
    for name in sorted(stages):
        need = needs(getattr(ccfg, name))
        if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
            have = "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(n.items()) if not k.startswith("node:"))
                             for n in nodes)
            raise QuantStudyError(f"no node of the cluster can run the {name} stage: it asks for "
                                  f"{', '.join(f'{k} {v:g}' for k, v in need.items())}; nodes have: {have or 'none'}",
                                  field=f"cluster.{name}", fix="lower the request in the study's cluster: section, "
                                  "or add a node that has it")


def slots(nodes: list[dict[str, float]], res: Any) -> int:
    """How many tasks of a stage the cluster can run at once (each node: its scarcest resource)."""
    need = needs(res)
    return sum(min((math.floor(n.get(k, 0) / v) for k, v in need.items()), default=1) for n in nodes)


Part = tuple[str, "tuple[int, int] | None"]  # (task entry key, (part i, of n) or None = the whole entry)


def evaluate_parts(cfg: Any, data_dir: Path | None, models: int, workers: int) -> list[Part]:
    """One model's evaluation as bundles: each task entry whole, or cut into n parts when the study's
    items over (`tasks_per_worker` x workers) bundles is smaller than the entry. A part holds at least
    one batch. lm-eval entries run lm-eval's own request pipeline and stay whole."""
    from quantstudy.tasks.selection import select_items

    ecfg = cfg.evaluate
    if ecfg is None:
        return []
    sizes = {s.key: len(select_items(s, ecfg, data_dir)) for s in ecfg.task_specs()}
    want = (cfg.cluster.tasks_per_worker if cfg.cluster else 2) * max(1, workers)
    bundle = max(ecfg.batch_size, math.ceil(sum(sizes.values()) * models / want))
    parts: list[Part] = []
    for key, n_items in sizes.items():
        n = max(1, min(math.ceil(n_items / bundle), n_items // ecfg.batch_size))
        parts += [(key, None)] if n == 1 else [(key, (i, n)) for i in range(n)]
    return parts + [(s.key, None) for s in ecfg.lmeval_specs()]


def waves(steps: list[Any]) -> list[int]:
    """For `plan`: the earliest round each stage could start in on a big enough cluster, by the
    executor's rules (after the models it reads; fidelity per parent in turn; measure alone, last).
    Stages with the same number can run at the same time."""
    maker = {s.model: i for i, s in enumerate(steps) if s.stage in MAKE}
    wave: list[int] = [0] * len(steps)
    last_fid: dict[str, int] = {}
    for i, s in enumerate(steps):  # plan order is topological
        reads = s.parents if s.stage in MAKE else [s.model, *s.parents]
        wave[i] = 1 + max([wave[maker[m]] for m in reads if m in maker and maker[m] != i] or [0])
        if s.stage == "fidelity":
            wave[i] = max(wave[i], last_fid.get(s.parents[0], 0) + 1)
            last_fid[s.parents[0]] = wave[i]
    top = max([w for w, s in zip(wave, steps) if s.stage != "measure"] or [0])
    for i, s in enumerate(steps):
        if s.stage == "measure":
            top += 1
            wave[i] = top
    return wave


def ray_address(flag: str | None) -> str | None:
    """The --ray-address flag, else RAY_ADDRESS; None runs in process."""
    return flag or os.environ.get("RAY_ADDRESS") or None
