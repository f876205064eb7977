"""Which items of a task a study evaluates: the same for every model of the study.

A plain function of the task spec, the evaluation settings and the data folder, so the
evaluate stage, the held-out guard (data/heldout.py) and the report all see the same items.
"""

from __future__ import annotations

import random
from pathlib import Path

from quantstudy.config import EvaluateConfig, LimitMode, TaskSpec
from quantstudy.errors import QuantStudyError
from quantstudy.tasks import get_task
from quantstudy.tasks.base import Item


def select_items(spec: TaskSpec, ecfg: EvaluateConfig, data_dir: Path | None) -> list[Item]:
    """The task's items after `limit`; identical for every model (depends on data, seed, limit only)."""
    items = get_task(spec.name).eval_items(data_dir)
    n = spec.limit
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise QuantStudyError("limit must be >= 1", field="evaluate.limit", value=n, fix="use a positive limit or none")
    if ecfg.limit_mode is LimitMode.first:
        return items[:n]
    # a string seed is hashed with SHA-512 by `random`: stable across processes and platforms
    rnd = random.Random(f"{ecfg.seed}:{spec.name.value}")
    return [items[i] for i in sorted(rnd.sample(range(len(items)), n))]
