"""Per-item data from the store -> per-model scores and paired comparisons.

Every accuracy in the report is recomputed here from the store's items (metrics written by
the evaluation stage are not trusted for statistics). A metric is one of three kinds:
  binary      per-item right/wrong (`correct`): acc for multiple choice, exact match for
              squad_v2 / gsm8k / openmathinstruct2. Wilson interval, exact McNemar test.
  mean        per-item continuous score (`score`, e.g. SQuAD F1). Bootstrap interval and test.
  perplexity  per-document NLL in nats (`score`) weighted by words (details.n_words):
              word perplexity = exp(sum NLL / sum words), lm-eval's definition. Bootstrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from quantstudy.report import stats
from quantstudy.store import ItemRecord, Store


class Kind(str, Enum):
    binary = "binary"
    mean = "mean"
    perplexity = "perplexity"


def declared(task: str) -> tuple[str, str]:
    """A built-in task's right/wrong and continuous metric names, as the task declares them (tasks/)."""
    from quantstudy.tasks import TASKS

    t = next((t for n, t in TASKS.items() if n.value == task), None)
    return (t.primary_metric, t.score_metric or "score") if t is not None else ("acc", "score")


@dataclass(frozen=True)
class Metric:
    task: str
    name: str  # "acc", "em", "f1", "word_perplexity"
    kind: Kind

    @property
    def higher_is_better(self) -> bool:
        return self.kind != Kind.perplexity

    @property
    def label(self) -> str:
        return f"{self.task} {self.name}"


# item_id -> (item_hash, value, weight)
Column = dict[str, tuple[str, float, float]]


@dataclass
class Score:
    """One model on one metric: value with its 95% interval."""

    model: str
    task: str
    metric: str
    kind: Kind
    n: int
    value: float
    lo: float
    hi: float
    interval: str  # "Wilson" | "bootstrap"


def load_items(store: Store) -> dict[str, dict[str, list[ItemRecord]]]:
    """model -> task -> items, in store order."""
    out: dict[str, dict[str, list[ItemRecord]]] = {}
    for model, rec in store.items():
        out.setdefault(model, {}).setdefault(rec.task, []).append(rec)
    return out


def task_metrics(task: str, items: list[ItemRecord]) -> list[Metric]:
    """The metrics a task's items support, primary first."""
    out = []
    base = next((str(r.details["task_name"]) for r in items if "task_name" in r.details), task)  # an alias's task
    lmeval = next((str(r.details["metric"]) for r in items if r.details.get("metric")), None)  # lm-eval's name
    binary, continuous = declared(base)
    if any(r.correct is not None for r in items):
        out.append(Metric(task, lmeval or binary, Kind.binary))
    if any(r.score is not None for r in items):
        if any("n_words" in r.details for r in items):
            out.append(Metric(task, "word_perplexity", Kind.perplexity))
        else:
            out.append(Metric(task, lmeval or continuous, Kind.mean))
    return out


def column(items: list[ItemRecord], metric: Metric) -> Column:
    """Per-item (hash, value, weight) for one metric; items without a value are left out."""
    col: Column = {}
    for r in items:
        if metric.kind == Kind.binary:
            if r.correct is not None:
                col[r.item_id] = (r.item_hash, float(r.correct), 1.0)
        elif r.score is not None:
            w = float(r.details.get("n_words", 1.0)) if metric.kind == Kind.perplexity else 1.0
            col[r.item_id] = (r.item_hash, float(r.score), w)
    return col


def score(model: str, metric: Metric, col: Column) -> Score:
    x = np.array([v for _, v, _ in col.values()])
    w = np.array([w for _, _, w in col.values()])
    n = len(x)
    if metric.kind == Kind.binary:
        k = int(x.sum())
        lo, hi = stats.wilson(k, n)
        return Score(model, metric.task, metric.name, metric.kind, n, k / n if n else math.nan, lo, hi, "Wilson")
    lo, hi = stats.bootstrap_ci(x, w) if n else (math.nan, math.nan)
    value = x.sum() / w.sum() if n else math.nan
    if metric.kind == Kind.perplexity:  # the interval of NLL per word, mapped through exp
        value, lo, hi = math.exp(value), math.exp(lo), math.exp(hi)
    return Score(model, metric.task, metric.name, metric.kind, n, float(value), float(lo), float(hi), "bootstrap")


@dataclass
class Comparison:
    """`other` vs `ref` on the same items of one metric. ref is the reference (parent, or first of a pair).

    diff = other - ref in the metric's units (accuracy as a fraction; perplexity in ppl).
    ratio = other / ref: retention for accuracy-like metrics, perplexity ratio for perplexity.
    mde: paired minimum detectable effect at 80% power, in the units of diff (for perplexity:
    relative change of perplexity); None when the two models never disagree.
    """

    ref: str
    other: str
    task: str
    metric: str
    kind: Kind
    n: int
    ref_value: float
    other_value: float
    diff: float
    diff_lo: float | None
    diff_hi: float | None
    ratio: float | None
    ratio_lo: float | None
    ratio_hi: float | None
    test: str  # "McNemar exact" | "paired bootstrap"
    p: float
    mde: float | None
    right_to_wrong: int | None = None
    wrong_to_right: int | None = None
    excluded: int = 0  # items present in both but with different content hashes (not comparable)
    p_holm: float = math.nan  # filled in once all comparisons of the report are known

    @property
    def higher_is_better(self) -> bool:
        return self.kind != Kind.perplexity

    @property
    def label(self) -> str:
        return f"{self.task} {self.metric}"

    @property
    def significant(self) -> bool:
        return self.p_holm < stats.ALPHA

    @property
    def better(self) -> str | None:
        """The model that is significantly better after Holm, else None."""
        if not self.significant or self.diff == 0:
            return None
        return self.other if (self.diff > 0) == self.higher_is_better else self.ref


def compare(ref: str, other: str, metric: Metric, col_ref: Column, col_other: Column) -> Comparison | None:
    """Paired comparison on the items both models answered with identical content; None if none shared."""
    shared = [i for i in col_ref if i in col_other]
    same = [i for i in shared if col_ref[i][0] == col_other[i][0]]
    if not same:
        return None
    a = np.array([col_ref[i][1] for i in same])
    b = np.array([col_other[i][1] for i in same])
    w = np.array([col_ref[i][2] for i in same])
    boot = stats.paired_bootstrap(a, b, w)
    common = dict(ref=ref, other=other, task=metric.task, metric=metric.name, kind=metric.kind, n=len(same),
                  excluded=len(shared) - len(same))
    if metric.kind == Kind.binary:
        rw, wr = stats.flips(a.astype(bool), b.astype(bool))
        return Comparison(**common, ref_value=boot.stat_a, other_value=boot.stat_b, diff=boot.diff,
                          diff_lo=boot.diff_lo, diff_hi=boot.diff_hi, ratio=boot.ratio, ratio_lo=boot.ratio_lo,
                          ratio_hi=boot.ratio_hi, test="McNemar exact", p=stats.mcnemar_exact(rw, wr),
                          mde=stats.mde_paired_binary(len(same), rw + wr), right_to_wrong=rw, wrong_to_right=wr)
    mde = stats.mde_paired(len(same), boot.sd_diff) if boot.sd_diff > 0 else None
    if metric.kind == Kind.mean:
        return Comparison(**common, ref_value=boot.stat_a, other_value=boot.stat_b, diff=boot.diff,
                          diff_lo=boot.diff_lo, diff_hi=boot.diff_hi, ratio=boot.ratio, ratio_lo=boot.ratio_lo,
                          ratio_hi=boot.ratio_hi, test="paired bootstrap", p=boot.p, mde=mde)
    # perplexity: the bootstrap ran on NLL per word; exp maps a difference of NLL to a ratio of perplexities
    ppl_a, ppl_b = math.exp(boot.stat_a), math.exp(boot.stat_b)
    return Comparison(**common, ref_value=ppl_a, other_value=ppl_b, diff=ppl_b - ppl_a, diff_lo=None, diff_hi=None,
                      ratio=math.exp(boot.diff), ratio_lo=math.exp(boot.diff_lo), ratio_hi=math.exp(boot.diff_hi),
                      test="paired bootstrap", p=boot.p, mde=None if mde is None else math.exp(mde) - 1)
