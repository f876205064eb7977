"""Pairwise comparison tables (method, calibration size, training), fidelity, technical details."""

from __future__ import annotations

import json

from quantstudy.report import stats
from quantstudy.report import cells
from quantstudy.report import document as d
from quantstudy.report.analysis import Analysis, Pair, PairKind
from quantstudy.report.deploy import HEALTH_RULE
from quantstudy.report.document import Code, Document, Heading, Image, Para, Table
from quantstudy.report.recommend import RULE_PAIR, pair_verdict

_TITLES = {PairKind.method: "Method comparison at equal calibration",
           PairKind.scheme: "Scheme comparison at equal method",
           PairKind.calibration: "Calibration size at equal method"}


def pair_table(doc: Document, a: Analysis, p: Pair) -> None:
    comps = a.of_pair(p)
    ref, other = (comps[0].ref, comps[0].other) if comps else (p.ref, p.other)
    rows = [[c.label, cells.value(c.kind, c.ref_value), cells.value(c.kind, c.other_value), cells.diff(c),
             cells.flips(c), cells.p(c), str(c.n), cells.mde(c), cells.verdict(c)] for c in comps]
    ra, rb = a.model(ref), a.model(other)
    if ra.size_bytes and rb.size_bytes:
        smaller = min((ra, rb), key=lambda m: m.size_bytes).name  # type: ignore[arg-type, return-value]
        rows.append(["size on disk", d.size(ra.size_bytes), d.size(rb.size_bytes),
                     d.pct((rb.size_bytes - ra.size_bytes) / ra.size_bytes, sign=True), d.DASH, d.DASH, d.DASH, d.DASH,
                     "equal" if ra.size_bytes == rb.size_bytes else f"smaller: {smaller} (exact)"])
    da, db = a.deploy_of(ref), a.deploy_of(other)
    for label, x, y, fmt in (("latency mean", da.latency_s, db.latency_s, d.secs),
                             ("peak memory", da.peak_bytes, db.peak_bytes, d.size)):
        if x and y:
            rows.append([label, fmt(x), fmt(y), d.pct((y - x) / x, sign=True), d.DASH, d.DASH, d.DASH, d.DASH,
                         "not tested (one measurement)"])
    win = pair_verdict(comps)
    doc.add(Heading(3, p.title))
    doc.add(Table(["metric", ref, other, "Δ [95%]", "flips", "p raw / Holm", "n", "MDE", "winner"], rows,
                  f"Overall: {'prefer ' + win if win else 'no preference'} ({RULE_PAIR})."))


def pairs(doc: Document, a: Analysis) -> None:
    for kind, title in _TITLES.items():
        ps = a.pairs_of(kind)
        if ps:
            doc.add(Heading(2, title))
            for p in ps:
                pair_table(doc, a, p)
            doc.add(Para(cells.COMPARE_NOTE))


def _loss_span(loss: list[tuple[float, float]], first: bool) -> str:
    """Mean loss over the first or last fifth of the steps (at least one), with the steps it covers."""
    if not loss:
        return d.DASH
    k = max(1, round(len(loss) / 5))
    part = loss[:k] if first else loss[-k:]
    steps = f"step {part[0][0]:g}" if k == 1 else f"steps {part[0][0]:g}-{part[-1][0]:g}"
    return f"{sum(v for _, v in part) / k:.3f} ({steps})"


def training(doc: Document, a: Analysis) -> None:
    """Training cost and curve, then trained vs base: original models, and quantized at equal settings."""
    trained = [p for p in a.pairs_of(PairKind.parent) if a.model(p.other).role == "trained"]
    if not a.training and not trained:
        return
    doc.add(Heading(2, "Training effect"))
    rows = []
    for name, t in a.training.items():
        m, loss = t["metrics"], t["loss"]
        rows.append([name, a.model(name).describe, d.secs(m.get("train.seconds")), _loss_span(loss, first=True),
                     _loss_span(loss, first=False), d.size(m.get("train.peak_rss_bytes")),
                     d.DASH if m.get("train.tokens") is None else f"{m['train.tokens']:.0f}"])
    if rows:
        doc.add(Table(["model", "training", "wall time", "loss, first steps", "loss, last steps", "peak memory",
                       "tokens"], rows))
        doc.add(Para("*Training loss: mean over the first and the last fifth of the logged steps. One step's loss "
                     "is one batch of different rows (of different lengths when batches are length-grouped), so a "
                     "single step says little; what training changed on held-out items is in the tables below.*"))
    if any(t["loss"] for t in a.training.values()):
        doc.add(Image("train_loss", "Training loss per step"))
    for p in trained:
        pair_table(doc, a, Pair(PairKind.parent, p.ref, p.other, f"{p.other} vs {p.ref}: trained vs base, original"))
    for p in a.pairs_of(PairKind.training):
        pair_table(doc, a, p)
    if not a.pairs_of(PairKind.training):
        doc.add(Para("No quantized pair of base and trained models with equal settings."))
    doc.add(Para(cells.COMPARE_NOTE))


_FID = [("kl_mean", "KL mean (nats/token)", 4), ("kl_p99", "KL p99", 4), ("top1_agree", "top-1 agreement", None),
        ("ppl_ratio", "ppl ratio", 4), ("dp_rms", "RMS Δp(correct)", 4), ("answer_change_share", "answer changes", None)]


def fidelity(doc: Document, a: Analysis) -> None:
    if not a.fidelity:
        return
    doc.add(Heading(2, "Fidelity vs parent"))
    rows = []
    for name, f in a.fidelity.items():
        comps = [c for c in a.between(a.model(name).parent, name) if c.right_to_wrong is not None]
        row = [name, d.size(a.model(name).size_bytes)]
        row += [d.pct(f.get(k)) if digits is None else d.num(f.get(k), digits) for k, _, digits in _FID]
        row.append(", ".join(f"{c.task} {d.pts(c.diff)} ({c.right_to_wrong}/{c.wrong_to_right})" for c in comps)
                   or d.DASH)
        rows.append(row)
    doc.add(Table(["model", "size"] + [label for _, label, _ in _FID] + ["accuracy Δ (flips R→W/W→R)"], rows,
                  "KL(parent || model) per token on held-out text, top-1 agreement of next-token predictions, "
                  "perplexity ratio model / parent, and the share of multiple-choice items whose chosen answer "
                  "changed (from the fidelity stage's metrics)."))
    doc.add(Image("kl_vs_size", "Mean KL divergence vs size on disk"))


def _overrides(a: Analysis) -> str:
    return ", ".join(f"{t.value} {o.margin if o.margin is not None else a.decision.margin:g} "
                     f"{(o.margin_kind or a.decision.margin_kind).value}" for t, o in a.decision.tasks.items())


def _plain(v: object) -> str:
    if v is None:
        return d.DASH
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def technical(doc: Document, a: Analysis) -> None:
    doc.add(Heading(2, "Technical details"))
    doc.add(Table(["model", "role", "parent", "settings", "path", "weights hash"],
                  [[m.name, m.role, m.parent or d.DASH, m.describe, f"`{m.path}`", (m.weights_hash or d.DASH)[:16]]
                   for m in a.models]))
    doc.add(Para(f"Statistics: Wilson 95% intervals for accuracies; exact McNemar test (two-sided binomial on "
                 f"discordant items) for paired right/wrong outcomes; paired percentile bootstrap "
                 f"({stats.BOOT_RESAMPLES} resamples of items, seed {stats.BOOT_SEED}) for F1, perplexity, every "
                 f"difference interval and every retention interval; Holm correction over all "
                 f"{len(a.comparisons)} paired comparisons in this report; alpha {stats.ALPHA}; MDE at "
                 f"{stats.POWER:.0%} power. Deployment decisions are a separate family: non-inferiority at margin "
                 f"{a.decision.margin:g} {a.decision.margin_kind.value} (per-task overrides: "
                 f"{_overrides(a) or 'none'}), one-sided alpha {a.decision.alpha:g} split over the candidate variants "
                 f"(Bonferroni), no adjustment across one variant's deciding metrics (intersection-union); see the "
                 f"non-inferiority section for the bounds, the items each task needs and the formula. "
                 f"Generation health: {HEALTH_RULE}."))
    if a.evaluation:
        keys = ("limit", "limit_mode", "num_fewshot", "chat_template", "seed", "backend", "data")
        if any(info.get("chat_template_kwargs") for info in a.evaluation.values()):  # only when a study sets them
            keys = keys[:4] + ("chat_template_kwargs",) + keys[4:]
        doc.add(Table(["task"] + list(keys), [[t] + [_plain(info.get(k)) for k in keys]
                                              for t, info in sorted(a.evaluation.items())],
                      "How each task was evaluated, as recorded by the evaluation stage."))
    speed = [[dep.model, dep.backend or d.DASH, dep.weights or d.DASH, dep.measured or d.DASH, dep.caveat or d.DASH]
             for dep in (a.deploy_of(m.name) for m in a.models) if dep.backend or dep.measured]
    if speed:
        doc.add(Table(["model", "backend", "weights", "memory measured as", "caveat"], speed))
    run_times(doc, a)
    meta = a.meta
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    ev = cfg.get("evaluate") or {}
    facts = [["seed", str(cfg.get("seed", d.DASH))], ["evaluation limit", f"{ev.get('limit')} ({ev.get('limit_mode')})"],
             ["evaluation seed", str(ev.get("seed", d.DASH))], ["data directory", str(cfg.get("data_dir") or "hub")],
             ["trust_remote_code", str((cfg.get("model") or {}).get("trust_remote_code", False))]
             ] if cfg else []
    facts += [[key, json.dumps(meta[key]) if not isinstance(meta[key], str) else meta[key]]
              for key in ("data", "device") if key in meta]
    for key in ("versions", "hardware"):
        if isinstance(meta.get(key), dict):
            facts += [[f"{key}: {k}", str(v)] for k, v in meta[key].items()]
    if facts:
        doc.add(Table(["setting", "value"], facts))
    if cfg:
        doc.add(Para("Study configuration (as run):"), Code(json.dumps(cfg, indent=2, sort_keys=True)))


def run_times(doc: Document, a: Analysis) -> None:
    """Where the study's time went: one row per model, one column per stage (and per evaluated task)."""
    order = ("resolve", "train", "quantize", "evaluate", "measure", "fidelity")  # the study's stage order
    cols = sorted({k for t in a.times.values() for k in t},
                  key=lambda k: (k.startswith("evaluate: "), order.index(k) if k in order else len(order), k))
    if not cols:
        return
    rows = [[m.name] + [d.secs(a.times.get(m.name, {}).get(c)) for c in cols] for m in a.models if m.name in a.times]
    doc.add(Table(["model"] + cols, rows,
                  "Wall time of the run that produced each result (a cached stage keeps its first run's time). "
                  "evaluate = the sum of its tasks' scoring times (model loading excluded); a resumed evaluation "
                  "times only the items it scored."))
