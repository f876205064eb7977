"""Per-task results: overview table, per-task detail vs parent, flips, MMLU breakdown, generation health."""

from __future__ import annotations

from quantstudy.report import cells
from quantstudy.report import document as d
from quantstudy.report.analysis import Analysis
from quantstudy.report.deploy import HEALTH_RULE
from quantstudy.report.document import Document, Heading, Image, Para, Table
from quantstudy.report.items import Kind, Score


def per_task(doc: Document, a: Analysis) -> None:
    doc.add(Heading(2, "Per-task results"))
    names = [m.name for m in a.models]
    rows = [[f"{mt.task} {mt.name}"] + [cells.score(a.score(n, mt.task, mt.name)) for n in names] for mt in a.metrics]
    # a capped MDE (= the baseline accuracy) means no drop at all would be detected reliably
    mde = {t: f"{100 * v:.1f} pt" if v < p0 else f"none detectable (baseline {d.pct(p0)})"
           for t, (_, p0, v) in a.design_mde.items()}
    for row, mt in zip(rows, a.metrics):
        n = max((s.n for s in a.scores if (s.task, s.metric) == (mt.task, mt.name)), default=0)
        row[1:1] = [str(n), mde.get(mt.task, d.DASH) if mt.kind == Kind.binary else d.DASH]
    doc.add(Table(["task metric", "n", "design MDE"] + names, rows,
                  "Score [95% interval]: Wilson for right/wrong metrics, percentile bootstrap (2000 resamples) for F1 "
                  "and perplexity. Design MDE: the accuracy drop an unpaired two-sample test of n vs n items "
                  "detects with 80% power at the baseline's accuracy (Cohen's h; conservative for paired tests)."))
    doc.add(Image("per_task", "Per-task scores with 95% intervals"))
    for mt in a.metrics:
        doc.add(Heading(3, f"{mt.task}: {mt.name}"))
        rows = []
        for m in a.models:
            s = a.score(m.name, mt.task, mt.name)
            cs = a.between(m.parent, m.name) if m.parent else []
            c = next((c for c in cs if (c.task, c.metric) == (mt.task, mt.name)), None)
            if c is None:
                rows.append([m.name, cells.score(s), m.parent or "(reference)"] + [d.DASH] * 7)
                continue
            rows.append([m.name, cells.score(s), m.parent or "", cells.diff(c), cells.retention(c), cells.flips(c),
                         cells.p(c), str(c.n), cells.mde(c), cells.verdict(c)])
        doc.add(Table(["model", "score [95%]", "vs", "Δ vs parent [95%]", "retention [95%]",
                       "flips (R→W / W→R)", "p raw / Holm", "n", "MDE", "winner"], rows))
    doc.add(Para(cells.COMPARE_NOTE + " Retention = model / parent with its paired-bootstrap interval; above 100% "
                 "it is reported as within noise unless the gain is significant."))


def flips(doc: Document, a: Analysis) -> None:
    comps = [c for c in a.comparisons if c.right_to_wrong is not None and a.model(c.other).parent == c.ref]
    if not comps:
        return
    doc.add(Heading(2, "Flips vs parent"))
    doc.add(Table(["model", "vs", "task", "accuracy Δ", "right→wrong", "wrong→right", "changed share", "n"],
                  [[c.other, c.ref, c.task, d.pts(c.diff), str(c.right_to_wrong), str(c.wrong_to_right),
                    d.pct((c.right_to_wrong + c.wrong_to_right) / c.n), str(c.n)] for c in comps],  # type: ignore[operator]
                  "Items answered right by the parent and wrong by the model, and the reverse: accuracy can stay "
                  "flat while many answers change."))
    doc.add(Image("flips", "Right→wrong and wrong→right flips per model and task"))


def _breakdown(doc: Document, a: Analysis, scores: list[Score], what: str) -> None:
    names = [m.name for m in a.models]
    base = next((m.name for m in a.models if m.role == "baseline"), names[0])
    groups = sorted({s.task for s in scores})
    by = {(s.model, s.task): s for s in scores}
    rows = []
    for g in groups:
        n = max(s.n for s in scores if s.task == g)
        row = [g, str(n)]
        for name in names:
            s, ref = by.get((name, g)), by.get((base, g))
            text = cells.score(s)
            if s and ref and name != base:
                text += f" ({d.pts(s.value - ref.value)})"
            row.append(text)
        rows.append(row)
    doc.add(Table([what, "n"] + names, rows, f"Accuracy [Wilson 95%] per {what}, micro-averaged over its questions "
                  f"(lm-eval's document-weighted aggregate); (Δ vs {base}) is descriptive, not tested."))


def mmlu(doc: Document, a: Analysis) -> None:
    if not a.mmlu_category and not a.mmlu_subject:
        return
    doc.add(Heading(2, "MMLU by category and subject"))
    if a.mmlu_category:
        doc.add(Heading(3, "By category"))
        _breakdown(doc, a, a.mmlu_category, "category")
    if a.mmlu_subject:
        doc.add(Heading(3, "By subject"))
        _breakdown(doc, a, a.mmlu_subject, "subject")


def subsets(doc: Document, a: Analysis) -> None:
    """Per-subset scores (SQuAD v2 HasAns / NoAns) and lm-eval group aggregates."""
    if a.subsets:
        doc.add(Heading(2, "Scores by subset"))
        rows = [[s.task, s.subset, s.score.metric, s.score.model, str(s.score.n), cells.score(s.score),
                 s.vs_parent.ref if s.vs_parent else d.DASH, cells.diff(s.vs_parent) if s.vs_parent else d.DASH,
                 cells.flips(s.vs_parent) if s.vs_parent else d.DASH,
                 d.num(s.vs_parent.p, 3) if s.vs_parent else d.DASH] for s in a.subsets]
        doc.add(Table(["task", "subset", "metric", "model", "n", "score [95%]", "vs", "Δ vs parent [95%]",
                       "flips (R→W / W→R)", "p (raw)"], rows,
                      "SQuAD v2's official split: HasAns = questions with an answer in the passage, NoAns = "
                      "unanswerable ones (right = the model abstains). A gain overall that is only more abstention "
                      "shows as NoAns up and HasAns down. Paired tests here are descriptive (raw p, outside the "
                      "Holm family of the per-task table)."))
    if a.groups:
        doc.add(Heading(2, "lm-eval groups"))
        names = [m.name for m in a.models]
        keys = sorted({(g.group, g.metric) for g in a.groups})
        by = {(g.group, g.metric, g.model): g for g in a.groups}
        rows = []
        for grp, metric in keys:
            first = next(g for g in a.groups if (g.group, g.metric) == (grp, metric))
            rows.append([grp, metric, d.DASH if first.n is None else str(first.n), ", ".join(first.subtasks)]
                        + [d.num(by[grp, metric, n].value, 4) if (grp, metric, n) in by else d.DASH for n in names])
        doc.add(Table(["group", "metric", "n", "subtasks"] + names, rows,
                      "lm-eval's own group aggregate (its aggregate_metric_list: mean over subtasks, weighted by "
                      "size when the group says so), computed from the same per-item values. Each subtask has its "
                      "own row, interval and paired tests in the per-task table."))


def health(doc: Document, a: Analysis) -> None:
    if not a.health:
        return
    doc.add(Heading(2, "Generation health"))
    doc.add(Table(["model", "source", "n", "hit max_new_tokens", "empty", "mean tokens/response", "flags"],
                  [[h.model, h.source, d.DASH if h.n is None else str(h.n), d.pct(h.hit_max_share),
                    d.pct(h.empty_share), d.num(h.mean_tokens, 1), "; ".join(h.flags) or "ok"] for h in a.health],
                  f"Generative evaluation items and the speed benchmark's prompts; {HEALTH_RULE}."))
    think = [h for h in a.health if h.reasoning_share is not None]
    if think:  # thinking models: tokens spent reasoning, and what was scored (the text after the block)
        doc.add(Table(["model", "task", "with reasoning", "mean reasoning tokens", "reasoning hit max_new_tokens",
                       "an answer read after the block"],
                      [[h.model, h.source, d.pct(h.reasoning_share), d.num(h.reasoning_tokens, 1),
                        d.pct(h.reasoning_hit_max_share),
                        d.DASH if h.answer_example is None else repr(h.answer_example[:60])] for h in think],
                      "Responses that opened a reasoning block (model.think_start_token/think_end_token): the answer "
                      "is scored on the text after the block; a response whose reasoning hit max_new_tokens has no "
                      "answer (scored wrong); mean tokens/response above includes the reasoning."))
