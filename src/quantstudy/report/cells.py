"""Table cells for scores and comparisons, shared by every section (one wording everywhere)."""

from __future__ import annotations

from quantstudy.report import document as d
from quantstudy.report.items import Comparison, Kind, Score

TIE = "inconclusive (n.s.)"


def score(s: Score | None) -> str:
    if s is None:
        return d.DASH
    if s.kind == Kind.perplexity:
        return f"{d.num(s.value, 2)} [{d.num(s.lo, 2)}, {d.num(s.hi, 2)}]"
    return f"{d.pct(s.value)} {d.interval(s.lo, s.hi)}"


def value(kind: Kind, v: float | None) -> str:
    return d.num(v, 2) if kind == Kind.perplexity else d.pct(v)


def diff(c: Comparison) -> str:
    """other - ref with its paired bootstrap interval (perplexity: the ratio other / ref)."""
    if c.kind == Kind.perplexity:
        return f"×{c.ratio:.3f} {d.interval(c.ratio_lo, c.ratio_hi, 1, 3)}"
    return f"{d.pts(c.diff)} {d.interval(c.diff_lo, c.diff_hi)}"


def retention(c: Comparison) -> str:
    """other / ref for higher-is-better metrics; above 100% only by noise unless significant."""
    if c.kind == Kind.perplexity:
        return f"ppl ×{c.ratio:.3f}"
    if c.ratio is None:
        return f"{d.DASH} (reference is 0)"
    text = f"{d.pct(c.ratio)} {d.interval(c.ratio_lo, c.ratio_hi, 100, 0)}"
    if c.ratio > 1 and c.better != c.other:
        text += " within noise"
    return text


def flips(c: Comparison) -> str:
    if c.right_to_wrong is None:
        return d.DASH
    return f"{c.right_to_wrong} / {c.wrong_to_right}"


def mde(c: Comparison) -> str:
    if c.mde is None:
        return "n/a (identical)" if c.right_to_wrong == 0 == c.wrong_to_right else d.DASH
    if c.kind == Kind.perplexity:
        return f"ppl ±{100 * c.mde:.1f}%"
    return f"{100 * c.mde:.1f} pt"


def verdict(c: Comparison) -> str:
    return f"**{c.better}**" if c.better else TIE


def p(c: Comparison) -> str:
    return f"{d.pval(c.p)} / {d.pval(c.p_holm)}"


COMPARE_NOTE = ("Δ: difference with its 95% paired-bootstrap interval (perplexity: ratio). p: raw / Holm-adjusted "
                "over all comparisons in this report (McNemar exact on right/wrong items, paired bootstrap for F1 and "
                "perplexity). MDE: smallest true difference this n detects with 80% power (two-sided, alpha 0.05, "
                "paired; right/wrong: (z0.975 + z0.8)·sqrt(discordant share / n)). flips: right→wrong / wrong→right. "
                "Winner only when Holm-adjusted p < 0.05, else " + TIE + ".")
