"""results.json: every number of the report, machine-readable (strict JSON: NaN/inf become null)."""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from typing import Any

from quantstudy.report import stats
from quantstudy.report.analysis import Analysis
from quantstudy.report.recommend import RankRow, Recommendation

SCHEMA = 1


def _clean(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _clean(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Enum):
        return x.value
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def results(a: Analysis, recs: list[Recommendation], rank: list[RankRow]) -> dict[str, Any]:
    comparisons = []
    for c in a.comparisons:
        row = _clean(c)
        row.update(significant=c.significant, better=c.better)
        comparisons.append(row)
    return {
        "schema": SCHEMA,
        "statistics": {"alpha": stats.ALPHA, "power": stats.POWER, "accuracy_interval": "Wilson 95%",
                       "paired_binary_test": "McNemar exact (two-sided binomial on discordant items)",
                       "paired_continuous_test": "paired percentile bootstrap",
                       "bootstrap_resamples": stats.BOOT_RESAMPLES, "bootstrap_seed": stats.BOOT_SEED,
                       "multiple_comparisons": f"Holm over all {len(a.comparisons)} comparisons",
                       "noninferiority": "one-sided Tango score bound (right/wrong) or paired bootstrap bound; alpha "
                                         "split over candidate variants (Bonferroni); intersection-union across a "
                                         "variant's deciding metrics",
                       "mde": "paired: (z_{1-a/2} + z_power) * sd(per-item difference) / sqrt(n); "
                              "design: unpaired two-proportion (Cohen's h) at the baseline accuracy"},
        "models": _clean(a.models),
        "tasks": a.tasks,
        "scores": _clean(a.scores),
        "comparisons": comparisons,
        "pairs": _clean(a.pairs),
        "mmlu_category": _clean(a.mmlu_category),
        "mmlu_subject": _clean(a.mmlu_subject),
        "subsets": _clean(a.subsets),
        "lmeval_groups": _clean(a.groups),
        "deploy": _clean(a.deploy),
        "generation_health": _clean(a.health),
        "fidelity": _clean(a.fidelity),
        "training": _clean(a.training),
        "wall_seconds": _clean(a.times),
        "design_mde": {t: {"n": n, "baseline_accuracy": p0, "mde": m} for t, (n, p0, m) in a.design_mde.items()},
        "decision": a.decision.model_dump(mode="json"),
        "noninferiority": [{**_clean(r), "shown": r.shown} for r in a.noninferiority],
        "ranking": _clean(rank),
        "recommendations": _clean(recs),
        "warnings": a.warnings,
        "meta": _clean(a.meta),
    }
