"""Deployment decisions by non-inferiority, and the number of items they need.

A quantized variant is "no worse than its parent within the margin" on a metric only when the
one-sided (1 - alpha') upper confidence bound of its loss is below the margin (absence of a
significant loss is not evidence of no loss):
  right/wrong metrics  Tango's score bound for the difference of paired proportions
                       (stats.tango_upper): exact-enough at small n and informative when the two
                       models never disagree, where a bootstrap interval collapses to [0, 0].
  F1 / perplexity      the paired percentile bootstrap's one-sided bound (the 1 - 2 alpha' interval's end).
Multiplicity: a recommendation needs non-inferiority on ALL deciding metrics of a variant, an
intersection-union test, which is level alpha' without adjustment across those metrics (each must
pass on its own). Several variants compete for the recommendation, so alpha is split over them
(Bonferroni: alpha' = alpha / number of candidate variants): the chance of recommending any variant
whose true loss exceeds the margin stays <= alpha. The superiority tests ("significantly worse",
Holm over the report) are a separate family and unchanged.

Units: a loss and its margin are fractions: accuracy points (0.01 = 1 point) or, for perplexity,
relative (0.01 = 1% higher perplexity). A relative margin on an accuracy-like metric is turned into
points at the parent's observed score (the parent's own sampling error is not propagated: stated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from quantstudy.report import stats
from quantstudy.config import DecisionConfig, MarginKind, TaskName
from quantstudy.runtime.estimate import FULL_ITEMS
from quantstudy.report.items import Column, Kind, Metric

if TYPE_CHECKING:
    from quantstudy.config import StudyConfig
    from quantstudy.report.analysis import Analysis

# Items in each built-in task's evaluation split (the offline data and the hub's agree; a test counts
# them): what "does the task have that many items" is checked against.
EVAL_ITEMS = {t.value: n for t, n in FULL_ITEMS.items()}  # evaluation-split sizes, written once in estimate.py


@dataclass
class NonInferiority:
    """`other` vs its parent `ref` on one metric. loss, bound and margin share units (see module doc)."""

    ref: str
    other: str
    task: str
    metric: str
    kind: Kind
    deciding: bool
    n: int
    loss: float  # observed: parent - variant (perplexity: variant / parent - 1)
    bound: float  # one-sided (1 - alpha) upper confidence bound of the loss
    margin: float
    margin_note: str  # how the margin was stated, e.g. "1.0 pt" or "1.0% of 60.0%"
    alpha: float  # per-variant level after the split over candidates
    method: str
    discordance: float | None  # share of items answered differently (right/wrong metrics)
    n_needed: int | None  # items to show non-inferiority with `power` if the true loss is 0
    n_needed_observed: int | None  # ... if the true loss is the observed one (None: not reachable)
    available: int | None  # items in the task's evaluation split

    @property
    def shown(self) -> bool:
        return self.bound < self.margin

    @property
    def relative(self) -> bool:
        return self.kind == Kind.perplexity

    @property
    def label(self) -> str:
        return f"{self.task} {self.metric}"


def decision_config(meta: dict[str, Any]) -> tuple[DecisionConfig, str | None]:
    """The study's `decision:` section as run (defaults for stores written before it existed)."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    try:
        return DecisionConfig.model_validate(cfg.get("decision") or {}), None
    except ValidationError as e:
        return DecisionConfig(), f"the stored decision settings are invalid ({e.errors()[0]['msg']}); defaults used"


def is_deciding(dc: DecisionConfig, mt: Metric, primary: Metric) -> bool:
    """Default: every right/wrong metric. `deciding: [task]` means its primary metric; task.metric names one."""
    if dc.deciding is None:
        return mt.kind == Kind.binary
    return f"{mt.task}.{mt.name}" in dc.deciding or (mt.task in dc.deciding and mt == primary)


def margin_of(dc: DecisionConfig, task: str) -> tuple[float, MarginKind]:
    over = dc.tasks.get(TaskName(task)) if task in TaskName._value2member_map_ else None
    return ((over.margin if over and over.margin is not None else dc.margin),
            (over.margin_kind if over and over.margin_kind is not None else dc.margin_kind))


def _paired(col_a: Column, col_b: Column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    same = [i for i in col_a if i in col_b and col_a[i][0] == col_b[i][0]]  # the items compare() pairs
    return (np.array([col_a[i][1] for i in same]), np.array([col_b[i][1] for i in same]),
            np.array([col_a[i][2] for i in same]))


def assess(ref: str, other: str, mt: Metric, col_ref: Column, col_other: Column, dc: DecisionConfig,
           alpha: float, deciding: bool) -> NonInferiority | None:
    a, b, w = _paired(col_ref, col_other)
    n = len(a)
    if n == 0:
        return None
    m, kind = margin_of(dc, mt.task)
    common = dict(ref=ref, other=other, task=mt.task, metric=mt.name, kind=mt.kind, deciding=deciding, n=n,
                  alpha=alpha, available=EVAL_ITEMS.get(mt.task))
    if mt.kind == Kind.perplexity:  # always relative: points of perplexity mean nothing across models
        boot = stats.paired_bootstrap(a, b, w, alpha=2 * alpha)  # on NLL per word; ratio of ppl = exp(diff)
        log_m = math.log1p(m / 100)
        return NonInferiority(**common, loss=math.expm1(boot.diff), bound=math.expm1(boot.diff_hi),
                              margin=m / 100, margin_note=f"{m:g}% perplexity", method="paired bootstrap",
                              discordance=None, n_needed=_n_mean(boot.sd_diff, log_m, alpha, dc.power, 0.0),
                              n_needed_observed=_n_mean(boot.sd_diff, log_m, alpha, dc.power, boot.diff))
    parent = float(a.sum() / w.sum())
    margin = m / 100 if kind == MarginKind.points else m / 100 * parent
    note = f"{m:g} pt" if kind == MarginKind.points else f"{m:g}% of {100 * parent:.1f}%"
    if mt.kind == Kind.binary:
        rw, wr = stats.flips(a.astype(bool), b.astype(bool))
        psi, loss = (rw + wr) / n, (rw - wr) / n
        return NonInferiority(**common, loss=loss, bound=stats.tango_upper(rw, wr, n, alpha), margin=margin,
                              margin_note=note, method="Tango score", discordance=psi,
                              n_needed=stats.n_noninferiority_binary(psi, margin, alpha, dc.power),
                              n_needed_observed=stats.n_noninferiority_binary(psi, margin, alpha, dc.power, loss))
    boot = stats.paired_bootstrap(a, b, w, alpha=2 * alpha)
    return NonInferiority(**common, loss=-boot.diff, bound=-boot.diff_lo, margin=margin, margin_note=note,
                          method="paired bootstrap", discordance=None,
                          n_needed=_n_mean(boot.sd_diff, margin, alpha, dc.power, 0.0),
                          n_needed_observed=_n_mean(boot.sd_diff, margin, alpha, dc.power, -boot.diff))


def _n_mean(sd: float, margin: float, alpha: float, power: float, loss: float) -> int | None:
    return stats.n_noninferiority_mean(sd, margin, alpha, power, loss) if sd > 0 else None


def noninferiority(a: Analysis, cols: dict) -> list[NonInferiority]:
    """Every quantized variant against its parent on every metric (deciding or not)."""
    dc = a.decision
    cands = [m for m in a.models if m.role == "quantized" and m.parent and any(x.name == m.parent for x in a.models)
             and any(s.model == m.name for s in a.scores)]
    alpha = dc.alpha / max(1, len(cands))
    out = []
    for m in cands:
        for mt in a.metrics:
            primary = next(x for x in a.metrics if x.task == mt.task)
            deciding = is_deciding(dc, mt, primary)
            if not cols[m.parent, mt]:
                continue
            r = (assess(m.parent, m.name, mt, cols[m.parent, mt], cols[m.name, mt],  # type: ignore[arg-type]
                        dc, alpha, deciding) if cols[m.name, mt] else None)
            if r is None and deciding:  # a deciding metric the variant has no paired items for cannot pass
                r = NonInferiority(m.parent, m.name, mt.task, mt.name, mt.kind, True, 0, math.nan, math.nan,  # type: ignore[arg-type]
                                   math.nan, "no paired items", alpha, "not evaluated", None, None, None,
                                   EVAL_ITEMS.get(mt.task))
            if r:
                out.append(r)
    return out


def needed_text(r: NonInferiority) -> str:
    """'~N items (has n; the task has M)' or why no n would do."""
    if r.n_needed is None:
        return "no estimate (no per-item variation)"
    if r.discordance == 0:  # no disagreement seen in n items does not mean none: the n is a floor
        return f"at least ~{r.n_needed} items (no disagreement seen in {r.n})"
    if r.available and r.n_needed > r.available:
        return f"~{r.n_needed} items (has {r.n}; the task has only {r.available})"
    return f"~{r.n_needed} items (has {r.n}" + (f" of {r.available})" if r.available else ")")


def plan_rows(cfg: StudyConfig, pilot: Path | None, discordance: float | None) -> tuple[list[list[str]], str]:
    """`quantstudy plan`: per deciding task, the items needed to show non-inferiority, from a pilot study's
    store (the largest discordance over its variants: conservative) or a stated discordance rate."""
    from quantstudy.config.variants import expand_variants

    dc, specs = cfg.decision, (cfg.evaluate.task_specs() if cfg.evaluate else [])
    # the candidates the report will split alpha over: every variant, and its trained copy when the study trains
    cands = len(expand_variants(cfg)) * (2 if cfg.train is not None else 1)
    alpha = dc.alpha / max(1, cands)
    observed: dict[str, tuple[float, str]] = {}
    if pilot is not None:
        observed = _pilot_discordance(pilot)
    rows = []
    for s in specs:
        task = s.name.value
        if task == "wikitext":
            continue  # perplexity only: not an accuracy metric, not deciding by default
        named = dc.deciding is None or task in dc.deciding or any(e.startswith(task + ".") for e in dc.deciding)
        if not named:
            continue
        psi, src = observed.get(task, (discordance, "stated")) if pilot else (discordance, "stated")
        m, kind = margin_of(dc, task)
        if psi is None:
            rows.append([task, f"{m:g} {'pt' if kind == MarginKind.points else '%'}", "-", "not in the pilot", "-",
                         str(s.limit or EVAL_ITEMS.get(task, "-")), "-"])
            continue
        # relative margins need the parent's accuracy; before anything runs it is unknown, so plan in points
        need = stats.n_noninferiority_binary(psi, m / 100, alpha, dc.power)
        planned = s.limit or EVAL_ITEMS.get(task)
        avail = EVAL_ITEMS.get(task)
        verdict = ("yes" if planned and need and need <= planned else
                   "no: the task has %d" % avail if avail and need and need > avail else "no: raise the limit")
        src += "; none seen: n is a floor" if psi == 0 else ""
        rows.append([task, f"{m:g} pt", f"{psi:.3f}", src, str(need), str(planned or "-"), verdict])
    note = (f"One-sided Tango score test at alpha {dc.alpha:g} / {max(1, cands)} candidate variants = "
            f"{alpha:.4f}, power {dc.power:.0%}, true loss 0 (Nam 1997's sample size for paired proportions). "
            "Relative margins are planned as points here (the parent's accuracy is not known before the run).")
    return rows, note


def _pilot_discordance(pilot: Path) -> dict[str, tuple[float, str]]:
    from quantstudy.errors import QuantStudyError
    from quantstudy.report import items
    from quantstudy.store import Store

    path = pilot / "store.sqlite"
    if not path.is_file():
        raise QuantStudyError("the pilot study has no store", field="--pilot", value=str(pilot),
                              fix="pass a study directory that holds store.sqlite (a finished or partial run)")
    with Store(path) as store:
        models = {m.name: m for m in store.models()}
        by_model = items.load_items(store)
    out: dict[str, tuple[float, str]] = {}
    for m in models.values():
        if m.role != "quantized" or m.parent not in by_model or m.name not in by_model:
            continue
        for task, recs in by_model[m.name].items():
            mt = Metric(task, "acc", Kind.binary)
            a, b, _ = _paired(items.column(by_model[m.parent].get(task, []), mt), items.column(recs, mt))
            if len(a):
                psi = float(np.mean(a != b))
                if psi >= out.get(task, (-1.0, ""))[0]:
                    out[task] = (psi, f"pilot {m.name} vs {m.parent}, n={len(a)}")
    return out


def print_plan(console: Any, cfg: StudyConfig, pilot: Path | None, discordance: float | None) -> None:
    """The planning table of `quantstudy plan --pilot DIR | --discordance X` (rich console)."""
    from rich.table import Table

    rows, note = plan_rows(cfg, pilot, discordance)
    t = Table("task", "margin", "discordance", "from", "items needed", "study evaluates", "enough?",
              title=f"items needed to show non-inferiority ({cfg.decision.power:.0%} power)")
    for r in rows:
        t.add_row(*r)
    console.print(t)
    console.print(note)
