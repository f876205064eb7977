"""Ranking and recommendations: stated rules applied to the analysed numbers.

Each recommendation carries its rule as text, and the report prints the rule next to the
verdict, so a reader can check the verdict against the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantstudy import stats
from quantstudy.report.analysis import Analysis, PairKind
from quantstudy.report.items import Comparison

RETENTION_FLOOR = 0.99  # R1: "not significantly below 99% of the parent" on every task
RULE_DEPLOY = (f"R1: the smallest evaluated quantized model (size on disk; ties go to the higher mean accuracy) whose "
               f"retention vs its parent is not significantly below {RETENTION_FLOOR:.0%} on any accuracy metric "
               f"(the upper end of its 95% paired-bootstrap retention interval reaches {RETENTION_FLOOR:.0%}) "
               f"and that has no generation-health flag; perplexity is reported, not part of the rule")
RULE_BEST = ("R2: the highest mean accuracy over tasks (point estimate); called better than its parent only with "
             "a Holm-significant gain on at least one task and no significant loss")
RULE_PAIR = ("R3: in a pair, one model is preferred only if it wins at least one metric and loses none "
             "(McNemar exact or paired bootstrap, Holm-adjusted p < 0.05); otherwise no preference")


@dataclass
class RankRow:
    rank: int
    model: str
    mean_acc: float | None
    size_bytes: int | None
    pareto: bool
    better: list[str] = field(default_factory=list)  # tasks where it is significantly better than its parent
    worse: list[str] = field(default_factory=list)


@dataclass
class Recommendation:
    topic: str
    rule: str
    verdict: str
    model: str | None = None


def _vs_parent(a: Analysis, name: str) -> list[Comparison]:
    m = a.model(name)
    return a.between(m.parent, name) if m.parent else []


def ranking(a: Analysis) -> list[RankRow]:
    order = sorted(a.models, key=lambda m: (m.mean_acc is None, -(m.mean_acc or 0), m.size_bytes or 0))
    rows = []
    for i, m in enumerate(order, 1):
        comps = _vs_parent(a, m.name)
        rows.append(RankRow(i, m.name, m.mean_acc, m.size_bytes, m.pareto,
                            [c.label for c in comps if c.better == m.name],
                            [c.label for c in comps if c.better == c.ref]))
    return rows


def pair_verdict(comps: list[Comparison]) -> str | None:
    """The preferred model of a pair under RULE_PAIR, or None."""
    winners = {c.better for c in comps if c.better}
    return winners.pop() if len(winners) == 1 else None


def _pair_text(comps: list[Comparison], ref: str, other: str) -> str:
    """Plain words for a pair without a preferred model: tied, or each better somewhere."""
    wins = {m: [c.label for c in comps if c.better == m] for m in (ref, other)}
    if not wins[ref] and not wins[other]:
        ns = sorted({c.n for c in comps}) or [0]
        n = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]} to {ns[-1]} per metric"
        return f"no detectable difference ({n}, alpha = {stats.ALPHA} after Holm)"
    return "; ".join(f"{m} better on {', '.join(w)}" for m, w in wins.items() if w)


def _keeps_accuracy(c: Comparison) -> bool:
    if not c.higher_is_better or c.ratio is None:  # perplexity, or the parent scored 0: nothing to lose
        return True
    return (c.ratio_hi or 0) >= RETENTION_FLOOR


def recommendations(a: Analysis) -> list[Recommendation]:
    out = []
    flagged = {h.model for h in a.health if h.flags}
    quant = [m for m in a.models if m.role == "quantized"]
    ok = [m for m in quant if m.name not in flagged and _vs_parent(a, m.name)
          and all(_keeps_accuracy(c) for c in _vs_parent(a, m.name))]
    if ok:
        pick = min(ok, key=lambda m: (m.size_bytes or float("inf"), -(m.mean_acc or 0)))
        mde = max([c.mde or 0 for c in _vs_parent(a, pick.name) if c.higher_is_better] or [0])
        caveat = (f" At these sample sizes, losses smaller than about {100 * mde:.1f} points (largest paired MDE "
                  f"over its tasks) cannot be excluded." if mde else
                  " It answered every right/wrong item as its parent did.")
        out.append(Recommendation("deployment", RULE_DEPLOY, f"{pick.name} ({pick.describe}).{caveat}", pick.name))
    elif quant:
        out.append(Recommendation("deployment", RULE_DEPLOY,
                                  "no quantized model qualifies; keep the unquantized model or relax the rule"))
    if any(m.mean_acc is not None for m in a.models):
        best = max((m for m in a.models if m.mean_acc is not None), key=lambda m: m.mean_acc)  # type: ignore[arg-type]
        comps = _vs_parent(a, best.name)
        text = f"{best.name} (mean accuracy {100 * best.mean_acc:.1f}%)"  # type: ignore[operator]
        if not comps:
            text += "; it is the reference model"
        elif pair_verdict(comps) == best.name:
            text += f": significantly better than its parent {best.parent}"
        else:
            text += f", the highest point estimate; vs its parent {best.parent}: {_pair_text(comps, best.parent, best.name)}"
        out.append(Recommendation("most accurate", RULE_BEST, text, best.name))
    for kind in (PairKind.training, PairKind.method, PairKind.calibration):
        for p in a.pairs_of(kind):
            comps = a.of_pair(p)
            win = pair_verdict(comps)
            verdict = f"prefer {win}" if win else f"no preference: {_pair_text(comps, p.ref, p.other)}"
            out.append(Recommendation(f"{kind.value}: {p.ref} vs {p.other}", RULE_PAIR, verdict, win))
    for p in a.pairs_of(PairKind.parent):
        if a.model(p.other).role != "trained":
            continue
        comps = a.between(p.ref, p.other)
        win = pair_verdict(comps)
        verdict = {p.other: "train: the trained model is better", p.ref: "do not train: training made it worse"}.get(
            win or "", f"no preference: {_pair_text(comps, p.ref, p.other)}")
        out.append(Recommendation(f"training: {p.ref} vs {p.other}", RULE_PAIR, verdict, win))
    return out
