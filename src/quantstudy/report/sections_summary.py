"""Executive summary, model comparison, ranking and recommendations."""

from __future__ import annotations

from quantstudy.report import stats
from quantstudy.report import decide
from quantstudy.report import document as d
from quantstudy.report.analysis import Analysis, ModelInfo, PairKind
from quantstudy.report.deploy import Deploy
from quantstudy.report.document import Bullets, Document, Heading, Image, Para, Table
from quantstudy.report.items import Kind
from quantstudy.report.recommend import RankRow, Recommendation


def _mean_retention(a: Analysis, name: str) -> float | None:
    m = a.model(name)
    rs = [c.ratio for c in a.between(m.parent, name) if c.kind == Kind.binary and c.ratio is not None] if m.parent else []
    return sum(rs) / len(rs) if rs else None


def speed_text(dep: Deploy) -> str:
    if dep.speedup is not None:
        notes = [n for n in (dep.speedup_note, dep.caveat) if n]
        return f"{dep.speedup:.2f}x" + (f" ({'; '.join(notes)})" if notes else "")
    return dep.speedup_note or d.DASH


def memory_text(dep: Deploy) -> str:
    if dep.mem_reduction_bytes is None:
        return d.DASH
    vs32 = (f"; vs the parent in float32 {d.pct(dep.mem_reduction_vs_float32_pct / 100)}"
            if dep.mem_reduction_vs_float32_pct is not None else "")
    return f"{d.size(dep.mem_reduction_bytes)} ({d.pct(dep.mem_reduction_pct / 100)}{vs32})"  # type: ignore[operator]


def _how(dep: Deploy) -> str:
    packed = dep.weights == "packed"
    parts = [x for x in (dep.measured, f"{dep.weights} weights" if dep.weights else None, dep.backend,
                         f"{dep.activation_dtype} activations" if packed and dep.activation_dtype else None) if x]
    kl = (f"; packed vs decompressed model: KL {dep.kl_packed:.2g} nats/token, top-1 agreement {dep.top1_packed:.1%}"
          if dep.kl_packed is not None and dep.top1_packed is not None else "")
    return ", ".join(parts) + kl + (f"; {dep.caveat}" if dep.caveat else "")


def summary(doc: Document, a: Analysis, recs: list[Recommendation]) -> None:
    doc.add(Heading(2, "Executive summary"))
    out = []
    n_items = ", ".join(f"{t} n={max(s.n for s in a.scores if s.task == t)}" for t in a.tasks)
    out.append(f"{len(a.models)} model{'s' * (len(a.models) != 1)} on {len(a.tasks)} task"
               f"{'s' * (len(a.tasks) != 1)} ({n_items}).")
    out += [f"**{r.topic.capitalize()}**: {r.verdict}" for r in recs
            if r.topic in ("most accurate", "deployment") or r.topic.startswith("training")]
    for m in a.models:
        if not m.parent:
            out += _baseline_dtype(m.name, a.deploy_of(m.name))
            continue
        comps = a.between(m.parent, m.name)
        if not comps:
            out.append(f"**{m.name}** ({m.describe}): no results to compare with {m.parent}.")
            continue
        dep = a.deploy_of(m.name)
        worse = [c.label for c in comps if c.better == c.ref]
        better = [c.label for c in comps if c.better == m.name]
        rw = sum(c.right_to_wrong or 0 for c in comps)
        wr = sum(c.wrong_to_right or 0 for c in comps)
        ret = _mean_retention(a, m.name)
        what = "mean retention" if m.role == "quantized" else "mean accuracy ratio"
        text = (f"**{m.name}** ({m.describe}) vs {m.parent}: {what} {d.pct(ret)}"
                f"{' (within noise)' if ret and ret > 1 and not better else ''}; "
                f"significantly worse on {', '.join(worse) or 'no task'}, better on {', '.join(better) or 'no task'} "
                f"(Holm); flips {rw} right→wrong / {wr} wrong→right")
        if dep.size_reduction_pct is not None and dep.size_reduction_pct:
            text += f"; size {d.size(dep.size_bytes)} ({d.pct(-dep.size_reduction_pct / 100, sign=True)})"
        if dep.mem_reduction_bytes is not None:
            text += f"; memory reduction {memory_text(dep)} ({_how(dep)})"
        if dep.speedup is not None or dep.speedup_note:
            text += f"; speed-up {speed_text(dep)}"
        out.append(text + ".")
    out += decision_summary(a)
    flags = [f"{h.model} ({h.source}): {'; '.join(h.flags)}" for h in a.health if h.flags]
    out.append("**Generation health**: " + ("; ".join(flags) if flags else "no pathology flagged") + ".")
    if a.design_mde:
        t, (n, p0, mde) = max(a.design_mde.items(), key=lambda kv: kv[1][2])
        can = f"only drops of {100 * mde:.1f} points or more" if mde < p0 else "no drop at all"
        out.append(f"**What n can show**: on {t} (n={n}, baseline {d.pct(p0)}) an independent-samples test detects "
                   f"{can} with 80% power; the paired tests used here do better (MDE per comparison in the "
                   f"tables), but a 'tie' never means 'equal'.")
    out += [f"Warning: {w}" for w in a.warnings]
    doc.add(Bullets(out))


def _baseline_dtype(name: str, dep: Deploy) -> list[str]:
    """A root's bf16 and float32 figures side by side: the speed-ups and memory reductions of its variants
    are against its bf16 run (the packed kernels' activation dtype), which a CPU without native bf16 runs
    slower, and with more memory, than float32."""
    if dep.float32_tokens_per_s is None or dep.tokens_per_s is None:
        return []
    ratio = (f"{dep.bf16_vs_float32:.2f}x the float32 decode speed ({dep.bf16_vs_float32_note})"
             if dep.bf16_vs_float32 is not None else f"bf16/float32 decode ratio {dep.bf16_vs_float32_note or d.DASH}")
    mem = (f"; peak memory {d.size(dep.peak_bytes)} in bf16 vs {d.size(dep.float32_peak_bytes)} in float32"
           if dep.peak_bytes is not None and dep.float32_peak_bytes is not None else "")
    return [f"**{name} on this hardware**: dense bf16 {dep.tokens_per_s:.1f} tokens/s vs float32 "
            f"{dep.float32_tokens_per_s:.1f} (request rate, batch 1); bf16 runs at {ratio}{mem}. Speed-ups and memory "
            f"reductions of its variants are against its bf16 run; their notes also give the figure against float32."]


def _units(r: decide.NonInferiority, x: float | None) -> str:
    return d.DASH if x is None else (f"{100 * x:+.1f}%" if r.relative else d.pts(x))


def decision_summary(a: Analysis) -> list[str]:
    """One bullet: how many deciding metrics each variant passed, and the items each task would need."""
    rows = [r for r in a.noninferiority if r.deciding]
    if not rows:
        return []
    dc = a.decision
    passed = ", ".join(f"{name} {sum(r.shown for r in rows if r.other == name)} of "
                       f"{sum(1 for r in rows if r.other == name)}" for name in dict.fromkeys(r.other for r in rows))
    need = []
    for label in dict.fromkeys(r.label for r in rows):
        ns = sorted(r.n_needed for r in rows if r.label == label and r.n_needed)
        have = max(r.n for r in rows if r.label == label)
        span = f"~{ns[0]}" if ns and ns[0] == ns[-1] else f"~{ns[0]}-{ns[-1]}" if ns else "no estimate"
        need.append(f"{label} {span} (has {have})")
    return [f"**Non-inferiority** (margin {dc.margin:g} {'pt' if dc.margin_kind.value == 'points' else '%'}, one-sided "
            f"alpha {dc.alpha:g} split over {len({r.other for r in rows})} variants): deciding metrics shown no worse "
            f"than the parent: {passed}. Items needed to show it with {dc.power:.0%} power if the true loss is 0: "
            f"{'; '.join(need)}."]


def decision(doc: Document, a: Analysis) -> None:
    """Every quantized variant vs its parent: the non-inferiority verdict with its bound and margin, and n."""
    if not a.noninferiority:
        return
    dc = a.decision
    doc.add(Heading(2, "Deployment decision: non-inferiority"))
    rows = []
    for r in a.noninferiority:
        verdict = "**no worse within margin**" if r.shown else "not shown at this n"
        rows.append([r.other, r.ref, r.label, "yes" if r.deciding else "no", str(r.n), _units(r, r.loss),
                     _units(r, r.bound), r.margin_note, verdict, d.pct(r.discordance),
                     decide.needed_text(r), d.DASH if r.n_needed_observed is None else f"~{r.n_needed_observed}"])
    alpha = a.noninferiority[0].alpha
    doc.add(Table(["model", "vs", "metric", "deciding", "n", "loss", "loss bound", "margin", "verdict", "discordant",
                   "items needed (true loss 0)", "if the observed loss is true"], rows,
                  f"Loss = parent - model (perplexity: model / parent - 1). Loss bound: one-sided "
                  f"{100 * (1 - alpha):.2f}% upper confidence bound (alpha {dc.alpha:g} split over the "
                  f"{len({r.other for r in a.noninferiority})} candidate variants); the model is no worse within "
                  f"the margin only when the bound is below it. Discordant: share of items the two answer "
                  f"differently. Items needed: for {dc.power:.0%} power; a dash in the last column: no n shows it "
                  f"if the observed loss is the true one (it exceeds the margin)."))
    doc.add(Para(NI_NOTE))


NI_NOTE = ("*Non-inferiority: right/wrong metrics use Tango's score bound for the difference of paired proportions "
           "(it stays informative when the two models never disagree, where a bootstrap collapses to [0, 0]); F1 and "
           "perplexity the paired percentile bootstrap's one-sided bound. A recommendation needs every deciding metric "
           "to pass (an intersection-union test: no adjustment across the metrics of one variant, each must pass at "
           "its level); alpha is split over the candidate variants (Bonferroni), so the chance of recommending any "
           "variant whose true loss exceeds the margin is at most alpha. Items needed (Nam 1997's sample size for "
           "Tango's test; Connor 1987 for the two-sided superiority analogue): n = (z(1-a)·s0 + z(power)·s1)^2 / "
           "(margin - true loss)^2, s1^2 = discordance - true loss^2, s0^2 = the variance under loss = margin at the "
           "restricted MLE; it assumes the observed discordance is the true one and items like these (F1 and "
           "perplexity: a paired z-test with the observed SD of per-item differences).*")


def models_table(doc: Document, a: Analysis) -> None:
    doc.add(Heading(2, "Model comparison"))
    rows = []
    for m in a.models:
        dep = a.deploy_of(m.name)
        bpw = m.spec.get("bits_per_weight")  # quantized layers: payload + scales + zero points (#22)
        rows.append([m.name, m.role, m.describe + _activations_note(m),
                     f"{d.pct(m.mean_acc)} ({len(m.acc_tasks)} task{'s' * (len(m.acc_tasks) != 1)})",
                     d.pct(_mean_retention(a, m.name)), d.size(m.size_bytes) + (f" ({bpw:.2f} bits/weight)" if bpw else ""),
                     d.DASH if dep.size_reduction_pct is None else d.pct(dep.size_reduction_pct / 100)])
    doc.add(Table(["model", "role", "method", "mean accuracy", "mean retention vs parent", "size on disk",
                   "size reduction"], rows,
                  "Mean accuracy: unweighted mean of each task's right/wrong metric (acc, or exact match). Retention "
                  "= model / parent per task, averaged; intervals per task are in the task details."
                  + (_SCHEMES_NOTE if any(m.spec.get("bits_per_weight") or m.eval_activations for m in a.models)
                     else "")))
    if any(dep.latency_s or dep.peak_bytes for dep in a.deploy):
        rows = [[dep.model, d.secs(dep.latency_s), d.secs(dep.latency_p95_s), d.secs(dep.ttft_s),
                 d.num(dep.tokens_per_response, 1), d.num(dep.tokens_per_s, 1), speed_text(dep),
                 d.size(dep.peak_bytes), memory_text(dep), _how(dep)] for dep in
                (a.deploy_of(m.name) for m in a.models)]
        doc.add(Table(["model", "latency mean", "latency p95", "TTFT", "tokens/response", "tokens/s",
                       "speed-up vs parent", "peak memory", "memory reduction", "how measured"], rows,
                      "Speed-up (>1 = faster): the model's batch-1 decode rate / its parent's, measured paired "
                      "(both loaded, interleaved rounds over the same prompts) with a 95% bootstrap interval over "
                      "prompts; stores from before pairing: parent latency / model latency, marked unpaired. Shown "
                      "only when tokens per response differ by less than 1.25x and the machine was not busy. Latency, "
                      "TTFT and tokens/s are per request (prefill included). Memory reduction = parent peak - model "
                      "peak, the parent's from the same paired measurement."))


_SCHEMES_NOTE = (" Bits/weight: the saved quantized layers' bytes (packed weights, scales, zero points, global scales) "
                 "x 8 / their weights; the file size also holds the unquantized embeddings, norms and lm_head. "
                 "'evaluated with': what the loaded model did to its Linear inputs while scored, read off its modules; "
                 "activation-quantized and FP4 schemes run emulated in float32 on a CPU (quantstudy.config.schemes).")


def _activations_note(m: ModelInfo) -> str:
    """'; evaluated with activations ...' from what the evaluate stage recorded (nothing for stores before #22)."""
    ev = m.eval_activations
    if not ev or m.role != "quantized":
        return ""
    if not ev.get("activations_quantized"):
        return f"; evaluated with {ev.get('dtype', 'unquantized')} activations (not quantized)"
    kinds = ", ".join(f"{k} on {n} layers" for k, n in (ev.get("kinds") or {}).items())
    return f"; evaluated with activations quantized ({kinds}, emulated in {ev.get('dtype', 'float')})"


def ranking(doc: Document, a: Analysis, rows: list[RankRow]) -> None:
    doc.add(Heading(2, "Ranking"))
    doc.add(Table(["rank", "model", "mean accuracy", "size on disk", "Pareto front", "better than parent",
                   "worse than parent", "vs next rank"],
                  [[str(r.rank), r.model, d.pct(r.mean_acc), d.size(r.size_bytes), "yes" if r.pareto else "no",
                    ", ".join(r.better) or d.DASH, ", ".join(r.worse) or d.DASH, r.vs_next or d.DASH] for r in rows],
                  "Ordered by mean accuracy (point estimate). Vs next rank: distinguishable only where a Holm-"
                  f"significant paired test on a right/wrong metric (alpha {stats.ALPHA}) separates them; pairs the "
                  "study does not plan are not tested. Better/worse: Holm-significant paired tests against the parent."))
    doc.add(Image("accuracy_vs_size", "Mean accuracy vs size on disk with the Pareto front"))


def recommendations(doc: Document, a: Analysis, recs: list[Recommendation]) -> None:
    doc.add(Heading(2, "Recommendations"))
    if not recs:
        doc.add(Para("No recommendation: the study has a single model."))
    doc.add(Table(["topic", "recommendation", "rule"], [[r.topic, r.verdict, r.rule] for r in recs]))
    if a.pairs_of(PairKind.method) or a.pairs_of(PairKind.scheme) or a.pairs_of(PairKind.calibration):
        doc.add(Para("Pairs without a preference are not evidence that the settings are equivalent: see n and MDE "
                     "in the comparison tables."))
