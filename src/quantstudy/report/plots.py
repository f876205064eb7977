"""Report plots as PNG bytes (matplotlib, Agg canvas; no pyplot, so no global figure state).

Each function returns None when the study lacks the data for its plot; the renderers then
leave the plot out. PNG metadata carries no timestamp or version, so re-rendering is
byte-stable.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from quantstudy.report.analysis import Analysis
from quantstudy.report.items import Kind

_MiB = 1024 * 1024


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def accuracy_vs_size(a: Analysis) -> bytes | None:
    pts = [m for m in a.models if m.size_bytes and m.mean_acc is not None]
    if not pts:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for m in pts:
        ax.scatter(m.size_bytes / _MiB, 100 * m.mean_acc, s=50, color="tab:red" if m.pareto else "tab:blue",  # type: ignore[operator]
                   zorder=3)
        ax.annotate(m.name, (m.size_bytes / _MiB, 100 * m.mean_acc), fontsize=8,  # type: ignore[operator]
                    xytext=(4, 4), textcoords="offset points")
    front = sorted((m for m in pts if m.pareto), key=lambda m: m.size_bytes)  # type: ignore[arg-type, return-value]
    ax.step([m.size_bytes / _MiB for m in front], [100 * m.mean_acc for m in front], where="post",  # type: ignore[operator]
            color="tab:red", label="Pareto front")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("mean accuracy over tasks (%)")
    ax.set_title("Accuracy vs size")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def per_task(a: Analysis) -> bytes | None:
    mets = [mt for mt in a.metrics if mt.kind != Kind.perplexity]
    if not mets:
        return None
    names = [m.name for m in a.models]
    fig = Figure(figsize=(min(12.0, max(6.0, 0.35 * len(mets) * len(names) + 2)), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    x = np.arange(len(mets))
    for j, name in enumerate(names):
        ss = [a.score(name, mt.task, mt.name) for mt in mets]
        v = np.array([100 * s.value if s else np.nan for s in ss])
        err = np.array([[100 * (s.value - s.lo), 100 * (s.hi - s.value)] if s else [np.nan, np.nan] for s in ss]).T
        err = np.clip(err, 0, None)  # a bootstrap bound can sit a rounding error inside the point estimate
        ax.bar(x + (j - (len(names) - 1) / 2) * width, v, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(x, [f"{mt.task}\n{mt.name}" for mt in mets], fontsize=8)
    ax.set_ylabel("score (%), 95% interval")
    ax.set_title("Per-task scores")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def flips(a: Analysis) -> bytes | None:
    comps = [c for c in a.comparisons if c.right_to_wrong is not None and a.model(c.other).parent == c.ref]
    if not comps:
        return None
    fig = Figure(figsize=(7, 0.45 * len(comps) + 1.5))
    ax = fig.add_subplot()
    y = np.arange(len(comps))
    ax.barh(y, [-c.right_to_wrong for c in comps], color="tab:red", label="right→wrong")  # type: ignore[operator]
    ax.barh(y, [c.wrong_to_right for c in comps], color="tab:green", label="wrong→right")
    ax.set_yticks(y, [f"{c.other} / {c.task}" for c in comps], fontsize=8)
    ax.invert_yaxis()  # first model at the top, as in the tables
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("items changed vs parent")
    ax.set_title("Flips vs parent")
    ax.legend(fontsize=8)
    return _png(fig)


def kl_vs_size(a: Analysis) -> bytes | None:
    pts = [(a.model(n), f["kl_mean"]) for n, f in a.fidelity.items() if f.get("kl_mean") is not None]
    pts = [(m, kl) for m, kl in pts if m.size_bytes]
    if not pts:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for m, kl in pts:
        ax.scatter(m.size_bytes / _MiB, kl, s=50, zorder=3)  # type: ignore[operator]
        ax.annotate(m.name, (m.size_bytes / _MiB, kl), fontsize=8, xytext=(4, 4), textcoords="offset points")  # type: ignore[operator]
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("mean KL(parent || model), nats/token")
    ax.set_title("Fidelity vs size")
    ax.grid(alpha=0.3)
    return _png(fig)


def train_loss(a: Analysis) -> bytes | None:
    curves = {n: t["loss"] for n, t in a.training.items() if t["loss"]}
    if not curves:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name, pts in curves.items():
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def render_all(a: Analysis) -> dict[str, bytes]:
    """plot key -> PNG bytes, for the plots this study has data for."""
    out = {}
    for fn in (accuracy_vs_size, per_task, flips, kl_vs_size, train_loss):
        png = fn(a)
        if png is not None:
            out[fn.__name__] = png
    return out
