"""Everything the report shows, computed once from the store into plain dataclasses.

`analyze(store)` only reads. The renderers (markdown, html, json) format this object and
compute nothing. All paired comparisons of one report form one Holm family, whatever
table they appear in: variant vs parent, method vs method at equal calibration,
calibration size vs size at equal method, trained vs base at equal quantization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from quantstudy.report import stats
from quantstudy.errors import QuantStudyError
from quantstudy.config import DecisionConfig
from quantstudy.report import decide, deploy, items
from quantstudy.report.items import Comparison, Kind, Metric, Score
from quantstudy.report.answers import answer_metrics
from quantstudy.report.pairs import ModelInfo, Pair, PairKind, describe, plan_pairs, version_warnings
from quantstudy.store import Store


@dataclass
class Subset:
    """One model on one subset of a task's items (SQuAD v2 HasAns / NoAns), vs its parent on the same items."""

    task: str
    subset: str
    score: Score
    vs_parent: Comparison | None


@dataclass
class GroupScore:
    """lm-eval's aggregate of a group's subtasks (its aggregate_metric_list), as lm-eval computes it."""

    group: str
    metric: str
    model: str
    value: float
    n: int | None
    subtasks: list[str]


@dataclass
class Analysis:
    models: list[ModelInfo]
    tasks: list[str]
    metrics: list[Metric]
    scores: list[Score]
    comparisons: list[Comparison]  # the Holm family
    pairs: list[Pair]
    mmlu_category: list[Score]
    mmlu_subject: list[Score]
    deploy: list[deploy.Deploy]
    health: list[deploy.Health]
    fidelity: dict[str, dict[str, float]]
    training: dict[str, dict[str, Any]]  # trained model -> {"metrics": {...}, "loss": [(step, value)]}
    design_mde: dict[str, tuple[int, float, float]]  # task -> (n, baseline accuracy, unpaired MDE)
    meta: dict[str, Any]
    evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> how it was evaluated (info)
    # model -> {stage or "evaluate: <task>": wall seconds of the run that produced it}
    times: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    decision: DecisionConfig = field(default_factory=DecisionConfig)  # the study's `decision:` section
    noninferiority: list[decide.NonInferiority] = field(default_factory=list)  # quantized vs parent, every metric
    subsets: list[Subset] = field(default_factory=list)  # per-subset scores (SQuAD v2 HasAns / NoAns)
    groups: list[GroupScore] = field(default_factory=list)  # lm-eval group aggregates

    def model(self, name: str) -> ModelInfo:
        return next(m for m in self.models if m.name == name)

    def score(self, model: str, task: str, metric: str) -> Score | None:
        return next((s for s in self.scores if (s.model, s.task, s.metric) == (model, task, metric)), None)

    def between(self, ref: str, other: str) -> list[Comparison]:
        return [c for c in self.comparisons if (c.ref, c.other) == (ref, other)]

    def of_pair(self, p: Pair) -> list[Comparison]:
        """A pair's comparisons, in whichever orientation they were computed (each pair is tested once)."""
        return self.between(p.ref, p.other) or self.between(p.other, p.ref)

    def pairs_of(self, kind: PairKind) -> list[Pair]:
        return [p for p in self.pairs if p.kind == kind]

    def deploy_of(self, name: str) -> deploy.Deploy:
        return next(d for d in self.deploy if d.model == name)


def analyze(store: Store) -> Analysis:
    records = store.models()
    if not records:
        raise QuantStudyError(f"the study store {store.path} holds no models", field="study_dir",
                              value=str(store.path.parent), fix="run `quantstudy run STUDY.yaml` first")
    by_model = items.load_items(store)
    models = [ModelInfo(m.name, m.role, m.parent, describe(m), m.path, m.size_bytes, m.spec, m.weights_hash)
              for m in records]
    tasks = sorted({t for per in by_model.values() for t in per})
    metrics = [mt for t in tasks for mt in items.task_metrics(t, [r for per in by_model.values() for r in per.get(t, [])])]
    cols = {(m.name, mt): items.column(by_model.get(m.name, {}).get(mt.task, []), mt) for m in models for mt in metrics}
    scores = [items.score(m.name, mt, cols[m.name, mt]) for m in models for mt in metrics if cols[m.name, mt]]
    a = Analysis(models, tasks, metrics, scores, [], plan_pairs(models), [], [], [], [], {}, {}, {}, _meta(store))
    _compare_all(a, cols)
    a.decision, bad = decide.decision_config(a.meta)
    a.warnings += [bad] if bad else []
    a.noninferiority = decide.noninferiority(a, cols)
    _mmlu(a, by_model)
    _subsets(a, by_model)
    _summaries(a)
    _deployment(a, store, by_model)
    a.warnings += version_warnings(records, a.pairs)
    _times(a, store)
    return a


def _times(a: Analysis, store: Store) -> None:
    """Stage wall times (s) from the stage log, and per-task scoring times from the evaluation stage."""
    for st in store.stages():
        secs = json.loads(st["info"] or "{}").get("seconds") if st["status"] == "done" else None
        if secs is not None:
            a.times.setdefault(st["model"], {})[st["stage"]] = float(secs)
    for m in a.models:
        tasks = {n.removeprefix("time.eval."): v for _, n, v, _ in store.metrics(m.name)
                 if n.startswith("time.eval.") and v is not None}
        if tasks:  # a re-run evaluate stage times only what it re-scored: the tasks' sum is the evaluation
            t = a.times.setdefault(m.name, {})
            t["evaluate"] = sum(tasks.values())
            t.update({f"evaluate: {k}": v for k, v in tasks.items()})


def _compare_all(a: Analysis, cols: dict) -> None:
    seen: set[frozenset[str]] = set()
    for p in a.pairs:
        if frozenset((p.ref, p.other)) in seen:
            continue
        seen.add(frozenset((p.ref, p.other)))
        for mt in a.metrics:
            c = items.compare(p.ref, p.other, mt, cols[p.ref, mt], cols[p.other, mt])
            if c is not None:
                a.comparisons.append(c)
                if c.excluded:
                    a.warnings.append(f"{mt.task}: {c.excluded} items of {p.ref} and {p.other} share an id but not "
                                      "their content hash; they were left out of the paired test")
    for c, p in zip(a.comparisons, stats.holm([c.p for c in a.comparisons])):
        c.p_holm = p
    floor = 1 / (stats.BOOT_RESAMPLES + 1)  # the smallest p a bootstrap test can give
    if any(c.test == "paired bootstrap" for c in a.comparisons) and len(a.comparisons) * floor >= stats.ALPHA:
        a.warnings.append(f"with {len(a.comparisons)} comparisons, a paired-bootstrap test (p >= {floor:.5f}) cannot "
                          "reach Holm significance; F1 and perplexity differences are shown but never win")


def _mmlu(a: Analysis, by_model: dict) -> None:
    mt = Metric("mmlu", items.declared("mmlu")[0], Kind.binary)
    for m in a.models:
        recs = [r for r in by_model.get(m.name, {}).get("mmlu", []) if r.correct is not None]
        for key, out in (("category", a.mmlu_category), ("subject", a.mmlu_subject)):
            for group in sorted({str(r.details.get(key, "unknown")) for r in recs}):
                sub = [r for r in recs if str(r.details.get(key, "unknown")) == group]
                s = items.score(m.name, mt, items.column(sub, mt))
                s.task = group  # the category / subject name
                out.append(s)


# item subsets a task reports beside its overall score: name -> which items belong (SQuAD v2's official
# HasAns / NoAns split; the built-in task stores has_answer per item)
SUBSETS = {"has_answer": (("HasAns", True), ("NoAns", False))}


def _subsets(a: Analysis, by_model: dict) -> None:
    """Scores on each subset, and each model vs its parent on it (paired, descriptive: outside the Holm family),
    so a gain that is only more abstention (NoAns up, HasAns down) shows."""
    for mt in a.metrics:
        recs = [r for per in by_model.values() for r in per.get(mt.task, [])]
        for key, parts in SUBSETS.items():
            if not recs or not all(key in r.details for r in recs):
                continue
            for name, want in parts:
                cols = {m.name: items.column([r for r in by_model.get(m.name, {}).get(mt.task, [])
                                              if bool(r.details[key]) == want], mt) for m in a.models}
                for m in a.models:
                    if not cols[m.name]:
                        continue
                    c = (items.compare(m.parent, m.name, mt, cols[m.parent], cols[m.name])
                         if m.parent in cols and cols[m.parent] else None)
                    a.subsets.append(Subset(mt.task, name, items.score(m.name, mt, cols[m.name]), c))


def _groups(a: Analysis, metrics: dict[str, dict[str, tuple[Any, dict]]]) -> None:
    for m in a.models:
        for n, (v, info) in sorted(metrics[m.name].items()):
            if n.startswith("eval.") and isinstance(info, dict) and info.get("group") and v is not None:
                g = str(info["group"])
                a.groups.append(GroupScore(g, n.removeprefix(f"eval.{g}."), m.name, float(v), info.get("n"),
                                           list(info.get("subtasks") or [])))


def _summaries(a: Analysis) -> None:
    binary = [mt for mt in a.metrics if mt.kind == Kind.binary]
    for m in a.models:
        vals = [(mt.task, s.value) for mt in binary if (s := a.score(m.name, mt.task, mt.name))]
        m.acc_tasks = [t for t, _ in vals]
        m.mean_acc = sum(v for _, v in vals) / len(vals) if vals else None
    sized = [m for m in a.models if m.size_bytes and m.mean_acc is not None]
    for m in sized:  # Pareto: no other model is at least as small and as accurate, and better in one
        m.pareto = not any(o.size_bytes <= m.size_bytes and o.mean_acc >= m.mean_acc  # type: ignore[operator]
                           and (o.size_bytes < m.size_bytes or o.mean_acc > m.mean_acc) for o in sized)  # type: ignore[operator]
    base = next((m for m in a.models if m.role == "baseline"), None)
    for mt in binary:
        s = a.score(base.name, mt.task, mt.name) if base else None
        if s and s.n:
            a.design_mde[mt.task] = (s.n, s.value, stats.mde_unpaired(s.n, s.value))
    tasksets = {tuple(m.acc_tasks) for m in a.models if m.acc_tasks}
    if len(tasksets) > 1:
        a.warnings.append("models were evaluated on different task sets; mean accuracies are over each model's own "
                          "tasks and not directly comparable")
    missing = [m.name for m in a.models if not any(s.model == m.name for s in a.scores)]
    if missing:
        a.warnings.append(f"not evaluated (no items in the store): {', '.join(missing)}")
    for m in a.models:  # an interrupted evaluation leaves a model with fewer items than its parent
        for s in (s for s in a.scores if s.model == m.name and m.parent):
            ref = a.score(m.parent, s.task, s.metric)  # type: ignore[arg-type]
            if ref and s.n < ref.n and s.metric == next(mt.name for mt in a.metrics if mt.task == s.task):
                a.warnings.append(f"{m.name} has {s.n} of the {ref.n} {s.task} items its parent has (incomplete "
                                  "evaluation?): its score covers other items; paired tests use the shared ones")


def _deployment(a: Analysis, store: Store, by_model: dict) -> None:
    metrics = {m.name: {n: (v, i) for _, n, v, i in store.metrics(m.name)} for m in a.models}
    _groups(a, metrics)
    done: dict[str, deploy.Deploy] = {}
    health: dict[str, list[deploy.Health]] = {}
    depth = {m.name: _depth(a, m) for m in a.models}
    for m in sorted(a.models, key=lambda m: depth[m.name]):  # parents before the models derived from them
        d = deploy.deploy_row(m.name, m.role, m.size_bytes, metrics[m.name], done.get(m.parent or ""))
        done[m.name] = d
        a.deploy.append(d)
        health[m.name] = deploy.health_rows(m.name, by_model.get(m.name, {}), metrics[m.name], health.get(m.parent or ""))
        a.health.extend(health[m.name])
        for task in a.tasks:  # how each task was run, from the first model that records it (the baseline)
            if task not in a.evaluation and f"eval.{task}.n" in metrics[m.name]:
                a.evaluation[task] = metrics[m.name][f"eval.{task}.n"][1]
        if "activations.evaluate" in metrics[m.name]:
            m.eval_activations = metrics[m.name]["activations.evaluate"][1]
        fid = {n.removeprefix("fidelity."): v for n, (v, _) in metrics[m.name].items() if n.startswith("fidelity.")}
        if fid and m.parent:  # answer level: read off the stored items of both models (answers.py)
            fid.update({k: v for k, (v, _) in answer_metrics(store, m.name, m.parent).items()})
        if fid:
            a.fidelity[m.name] = fid
        if m.role == "trained":
            a.training[m.name] = {"metrics": {n: v for n, (v, _) in metrics[m.name].items() if n.startswith("train.")},
                                  "loss": store.series(m.name, "loss")}


def _depth(a: Analysis, m: ModelInfo) -> int:
    names, d = {x.name: x for x in a.models}, 0
    while m.parent in names and d < len(names):
        m, d = names[m.parent], d + 1  # type: ignore[index]
    return d


def _meta(store: Store) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("config", "versions", "hardware", "device", "data"):
        raw = store.get_meta(key)
        if raw is None:
            continue
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
