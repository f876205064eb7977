"""Ranking and recommendations: stated rules applied to the analysed numbers.

Each recommendation carries its rule as text, and the report prints the rule next to the
verdict, so a reader can check the verdict against the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantstudy.report import stats
from quantstudy.report import decide
from quantstudy.report.analysis import Analysis, PairKind
from quantstudy.report.items import Comparison, Kind

RULE_DEPLOY = ("R1 (non-inferiority): the smallest evaluated quantized model (size on disk; ties go to the higher mean "
               "accuracy) that is no worse than its parent within the study's margin on every deciding metric (the "
               "one-sided upper confidence bound of its loss is below the margin; alpha split over the candidate "
               "variants) and that has no generation-health flag; otherwise no recommendation at this n")
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
    vs_next: str = ""  # can this rank be told apart from the next one (a Holm-significant paired test)?


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
    for row, nxt in zip(rows, rows[1:]):
        # the ranking is by mean accuracy, so only the right/wrong metrics can tell two ranks apart
        comps = [c for c in a.between(row.model, nxt.model) or a.between(nxt.model, row.model) if c.kind == Kind.binary]
        sig = [c.label for c in comps if c.better]
        row.vs_next = ("not compared (no planned pair)" if not comps else
                       f"distinguishable ({', '.join(sig)})" if sig else "not distinguishable at this n")
    return rows


def pair_verdict(comps: list[Comparison]) -> str | None:
    """The preferred model of a pair under RULE_PAIR, or None."""
    winners = {c.better for c in comps if c.better}
    return winners.pop() if len(winners) == 1 else None


def _pair_text(comps: list[Comparison], ref: str, other: str, margin: float | None = None,
               alpha: float = stats.ALPHA) -> str:
    """Plain words for a pair without a preferred model: inconclusive (with the n that would settle it), or
    each better somewhere. margin (a fraction): the study's decision margin, for the items-needed estimate."""
    wins = {m: [c.label for c in comps if c.better == m] for m in (ref, other)}
    if not wins[ref] and not wins[other]:
        ns = sorted({c.n for c in comps}) or [0]
        n = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]} to {ns[-1]} per metric"
        need = [stats.n_noninferiority_binary((c.right_to_wrong + c.wrong_to_right) / c.n, margin, alpha)
                for c in comps if margin and c.kind == Kind.binary and c.n and c.right_to_wrong is not None]
        need = [x for x in need if x]
        would = (f"; would need ~{max(need)} items to show they are within {100 * margin:g} pt of each other"
                 if need else "")
        return f"inconclusive at this n ({n}, alpha = {stats.ALPHA} after Holm{would})"
    return "; ".join(f"{m} better on {', '.join(w)}" for m, w in wins.items() if w)


def _ni_text(r: decide.NonInferiority) -> str:
    unit = "%" if r.relative else " pt"
    return (f"{r.label} loss {100 * r.loss:+.1f}{unit}, bound {100 * r.bound:.1f}{unit} vs margin "
            f"{100 * r.margin:.2g}{unit}")


def _why_not(a: Analysis, cands: list[str]) -> str:
    """Per deciding metric that no candidate passes: the best bound, and the items that would settle it."""
    out = []
    rows = [r for r in a.noninferiority if r.deciding and r.other in cands]
    for label in dict.fromkeys(r.label for r in rows):
        same = [r for r in rows if r.label == label]
        if any(r.shown for r in same):
            continue
        best = min(same, key=lambda r: (r.n == 0, r.bound if r.n else 0.0))  # n = 0: no paired items, no bound
        if best.n == 0:
            out.append(f"{label}: no paired items")
            continue
        needs = [r for r in same if r.n_needed]
        need = f"; would need {decide.needed_text(min(needs, key=lambda r: r.n_needed))}" if needs else ""
        out.append(f"{label}: best bound {100 * best.bound:.1f}{'%' if best.relative else ' pt'} ({best.other}) "
                   f"> margin {best.margin_note}{need}")
    if not out:  # each metric is passed by some variant, but no variant passes them all
        for name in cands:
            fail = [f"{r.label} (bound {100 * r.bound:.1f} > {r.margin_note})" for r in rows
                    if r.other == name and not r.shown]
            out += [f"{name} fails {', '.join(fail)}"] if fail else []
    return "; ".join(out)


def recommendations(a: Analysis) -> list[Recommendation]:
    out = []
    margin = a.decision.margin / 100 if a.decision.margin_kind.value == "points" else None  # for items-needed estimates
    flagged = {h.model for h in a.health if h.flags}
    quant = [m for m in a.models if m.role == "quantized"]
    tested = sorted({r.other for r in a.noninferiority})
    ni = {name: [r for r in a.noninferiority if r.other == name and r.deciding] for name in tested}
    ok = [m for m in quant if ni.get(m.name) and m.name not in flagged and all(r.shown for r in ni[m.name])]
    if ok:
        pick = min(ok, key=lambda m: (m.size_bytes or float("inf"), -(m.mean_acc or 0)))
        out.append(Recommendation("deployment", RULE_DEPLOY,
                                  f"{pick.name} ({pick.describe}): no worse than its parent within the margin on every "
                                  f"deciding metric ({'; '.join(_ni_text(r) for r in ni[pick.name])}; one-sided "
                                  f"{100 * (1 - ni[pick.name][0].alpha):.2f}% bounds)", pick.name))
    elif quant:
        why = [_why_not(a, tested)] if tested else ["no quantized model has results to compare with its parent"]
        passed_but_flagged = sorted(n for n in tested if n in flagged and ni[n] and all(r.shown for r in ni[n]))
        if passed_but_flagged:
            why.append(f"{', '.join(passed_but_flagged)} passed but has a generation-health flag")
        out.append(Recommendation("deployment", RULE_DEPLOY,
                                  "no recommendation at this n: " + "; ".join(w for w in why if w)
                                  + ". Keep the unquantized model, or evaluate more items"))
    if any(m.mean_acc is not None for m in a.models):
        best = max((m for m in a.models if m.mean_acc is not None), key=lambda m: m.mean_acc)  # type: ignore[arg-type]
        comps = _vs_parent(a, best.name)
        text = f"{best.name} (mean accuracy {100 * best.mean_acc:.1f}%)"  # type: ignore[operator]
        if not comps:
            text += "; it is the reference model"
        elif pair_verdict(comps) == best.name:
            text += f": significantly better than its parent {best.parent}"
        else:
            text += (f", the highest point estimate; vs its parent {best.parent}: "
                     f"{_pair_text(comps, best.parent, best.name, margin)}")
        out.append(Recommendation("most accurate", RULE_BEST, text, best.name))
    for kind in (PairKind.training, PairKind.method, PairKind.scheme, PairKind.calibration):
        for p in a.pairs_of(kind):
            comps = a.of_pair(p)
            win = pair_verdict(comps)
            verdict = f"prefer {win}" if win else f"no preference: {_pair_text(comps, p.ref, p.other, margin)}"
            out.append(Recommendation(f"{kind.value}: {p.ref} vs {p.other}", RULE_PAIR, verdict, win))
    for p in a.pairs_of(PairKind.parent):
        if a.model(p.other).role != "trained":
            continue
        comps = a.between(p.ref, p.other)
        win = pair_verdict(comps)
        verdict = {p.other: "train: the trained model is better", p.ref: "do not train: training made it worse"}.get(
            win or "", f"no preference: {_pair_text(comps, p.ref, p.other, margin)}")
        out.append(Recommendation(f"training: {p.ref} vs {p.other}", RULE_PAIR, verdict, win))
    return out
