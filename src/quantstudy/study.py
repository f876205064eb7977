"""The study recipe, top to bottom: model -> [train] -> quantize -> evaluate -> measure -> fidelity -> report.

`plan` lists the stages the study needs, each under a key that hashes what can change its
output: the model it works on, the config its stage declares (`Stage.key_inputs`, next to
the stage's code), the data and the library versions. A stage whose key is recorded `done`
is skipped, so a re-run computes only what changed and a killed run resumes where it
stopped. `execute` runs the rest in order; this module is the only writer of the store:
each stage yields records (records.py) and each record is written in one transaction.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from quantstudy.runtime import environment
from quantstudy.data.heldout import check_held_out
from quantstudy.records import MadeModel, Note
from quantstudy.runtime.context import RunContext
from quantstudy.runtime.modeldir import decoder_layers
from quantstudy.stages.protocol import Job, Stage, StageName, key_of
from quantstudy.stages.resolve import fingerprint
from quantstudy.store import ModelRecord
from quantstudy.config.variants import Variant, expand_variants

BASE, TRAINED = "base", "trained"

# The stages, in recipe order: each module's `Stage` (name, key inputs, run). Imported when a
# plan needs them, so `quantstudy plan` does not load torch and transformers for a train stage
# it only lists.
STAGES = {StageName.resolve: "quantstudy.stages.resolve", StageName.train: "quantstudy.stages.train",
          StageName.quantize: "quantstudy.stages.quantize", StageName.evaluate: "quantstudy.stages.evaluate",
          StageName.measure: "quantstudy.stages.measure", StageName.fidelity: "quantstudy.stages.fidelity"}


def stage(name: StageName | str) -> Stage:
    return importlib.import_module(STAGES[StageName(name)]).Stage()


@dataclass
class Step:
    stage: str  # resolve | train | quantize | evaluate | measure | fidelity | report
    model: str
    key: str
    cached: bool = False
    seconds: float | None = None
    note: str = ""
    parents: list[str] = field(default_factory=list)
    legacy_key: str | None = None  # the key this stage had before keys moved next to their stage (#18)


def plan(ctx: RunContext) -> list[Step]:
    """The ordered list of stages the study needs, each marked cached or to run."""
    cfg, versions = ctx.cfg, environment.versions()
    variants = expand_variants(cfg)
    check_held_out(cfg, [(f"quantize: {v.name}: calibration.source", v.calibration) for v in variants
                         if v.calibration is not None], offline=ctx.data_dir is not None)
    steps = [Step("resolve", BASE, key_of("resolve", fingerprint(ctx.cfg.model, ctx.config_dir), *stage("resolve").key_inputs(cfg)))]
    # model-level chat template variables and reasoning markers shape what later stages render and
    # score; they join those keys only when set, so keys of studies that predate them do not change
    tpl = [cfg.model.chat_template_kwargs] if cfg.model.chat_template_kwargs else []
    think = list(cfg.model.think_markers_changed() or [])
    roots = [(BASE, steps[0].key)]
    # lm-eval tasks (#20): found, trusted and their data reachable, checked now (plan time); their user
    # YAML, code and data files join the evaluate key only when such tasks are listed
    specs = cfg.evaluate.lmeval_specs() if cfg.evaluate else []
    if specs:
        from quantstudy.tasks.lmeval_load import plan_check  # imports lm-eval: only for studies that use it
    lmeval = [plan_check(s, ctx.config_dir, cfg.evaluate.trust_task_code) for s in specs]
    if cfg.train is not None:
        steps.append(Step("train", TRAINED, key_of("train", steps[0].key, *stage("train").key_inputs(cfg), versions, *tpl),
                          parents=[BASE]))
        roots.append((TRAINED, steps[-1].key))
    for root, root_key in roots:
        for v in variants:
            name = v.name if root == BASE else f"{TRAINED}-{v.name}"
            steps.append(Step("quantize", name, key_of("quantize", root_key, v, *stage("quantize").key_inputs(cfg),
                                                       versions, *tpl, *stage("quantize").variant_key_inputs(v)),
                              parents=[root]))
    model_keys = {s.model: s.key for s in steps}
    parent_of = {s.model: s.parents[0] for s in steps if s.parents}
    for name, mkey in list(model_keys.items()):
        if cfg.evaluate is not None:
            context = (ctx.data_id, versions, *tpl, *think, *lmeval)
            steps.append(Step("evaluate", name, key_of("evaluate", mkey, *stage("evaluate").key_inputs(cfg), *context),
                              legacy_key=key_of("evaluate", mkey, cfg.evaluate, *context)))
            if cfg.evaluate.speed is not None:
                # a derived model is measured paired with its parent (same window, interleaved)
                parent = parent_of.get(name)
                pair = [model_keys[parent]] if parent else []
                # "paired": figures measured before the paired, packed-kernel method are not reused
                # a root's key also says its bf16/float32 pairing is recorded (speed.bf16_vs_float32)
                steps.append(Step("measure", name, key_of("measure", "paired", mkey, *stage("measure").key_inputs(cfg),
                                                          versions, *tpl, *(pair or ["bf16-vs-float32"])),
                                  parents=[parent] if parent else []))
    if cfg.fidelity is not None:
        for s in [s for s in steps if s.stage == "quantize"]:
            parent = s.parents[0]
            pair_keys = (s.key, model_keys[parent])
            steps.append(Step("fidelity", s.model, key_of("fidelity", *pair_keys, *stage("fidelity").key_inputs(cfg),
                                                           ctx.data_id, versions), parents=[parent],
                              legacy_key=key_of("fidelity", *pair_keys, cfg.fidelity, cfg.evaluate, ctx.data_id,
                                                versions)))
    for s in steps:
        s.cached = is_done(ctx, s) or bool(s.legacy_key and is_done(ctx, Step(s.stage, s.model, s.legacy_key)))
    return steps


def migrate_keys(ctx: RunContext, steps: list[Step]) -> None:
    """One-time: a stage done under its pre-#18 key is re-keyed, not recomputed. Old evaluate keys
    hashed the speed settings too, old fidelity keys the evaluation settings (for answer-level
    metrics the report now computes): the old key's inputs include the new one's, so its results hold."""
    moved = [s for s in steps if s.legacy_key and not is_done(ctx, s)
             and is_done(ctx, Step(s.stage, s.model, s.legacy_key))]
    if not moved:
        return
    with ctx.store.tx():
        for s in moved:
            ctx.store.rekey_stage(s.legacy_key, s.key)
    kinds = ", ".join(f"{sum(s.stage == k for s in moved)} {k}" for k in dict.fromkeys(s.stage for s in moved))
    ctx.console.print(f"[dim]store: re-keyed {kinds} stage(s) to keys declared by their stage (evaluate keys no "
                      "longer hash speed settings, fidelity keys no longer hash evaluation settings); nothing "
                      "is recomputed[/]", highlight=False, soft_wrap=True)


def is_done(ctx: RunContext, step: Step) -> bool:
    """Done = recorded done under this key, and its artifact (if any) still on disk."""
    done = ctx.store.stage_done(step.key)
    return done is not None and (not done.get("artifact") or Path(done["artifact"]).exists())


def variant_of(ctx: RunContext, name: str) -> Variant:
    plain = name.removeprefix(f"{TRAINED}-")
    return next(v for v in expand_variants(ctx.cfg) if v.name == plain)


def job_for(ctx: RunContext, step: Step) -> Job:
    """The plain data a stage runs on: the models it reads, the variant, where a made model goes,
    and (evaluate) the items already stored, so a resumed run scores only the rest."""
    models_dir = ctx.study_dir / "models"
    kw: dict[str, Any] = {}
    if step.stage in ("resolve", "train", "quantize"):
        models_dir.mkdir(parents=True, exist_ok=True)
        kw["out_dir"] = models_dir / step.model if step.stage != "resolve" else models_dir
    if step.stage in ("train", "quantize"):
        kw["model"] = _model(ctx, step.parents[0])  # the model it is made from
    if step.stage == "quantize":
        kw["variant"] = variant_of(ctx, step.model)
    if step.stage in ("evaluate", "measure", "fidelity"):
        kw["model"] = _model(ctx, step.model)
        kw["parent"] = _model(ctx, step.parents[0]) if step.parents else None
    if step.stage == "evaluate":
        stored: dict[str, dict[str, Any]] = {}
        for _, r in ctx.store.items(step.model):
            stored.setdefault(r.task, {})[r.item_id] = r
        kw["stored"] = stored
    return ctx.job(StageName(step.stage), step.model, **kw)


def drive(ctx: RunContext, job: Job, key: str | None = None) -> str | None:
    """Run one stage's job and write what it yields, each record in one transaction (the one
    writer). Returns the path of the model it made, if any."""
    from quantstudy.runtime.progress import make_progress

    artifact = None
    with make_progress(ctx.console) as view:  # rich bars on a terminal, timed plain lines elsewhere
        job.progress = view
        for rec in stage(job.stage).run(job):
            if isinstance(rec, Note):
                ctx.console.print(rec.text, highlight=False, soft_wrap=True)
                continue
            ctx.store.write(rec, key)
            if isinstance(rec, MadeModel):
                artifact = rec.model.path
    return artifact


def run_stage(ctx: RunContext, name: StageName | str, model: ModelRecord, *, parent: ModelRecord | None = None,
              made: str | None = None, variant: Variant | None = None, out_dir: Path | None = None) -> ModelRecord | None:
    """One stage outside a plan (tests, benchmarks), its records written as `execute` writes them.
    `model`: the model it works on (train/quantize: the one it makes `made` from, into `out_dir`).
    Returns the made model's record (make stages) or `model`'s, as stored."""
    sname = StageName(name)
    stored: dict[str, dict[str, Any]] = {}
    if sname is StageName.evaluate:
        for _, r in ctx.store.items(model.name):
            stored.setdefault(r.task, {})[r.item_id] = r
    job = ctx.job(sname, made or model.name, model=model, parent=parent, variant=variant, out_dir=out_dir,
                  stored=stored)
    drive(ctx, job)
    return ctx.store.model(made or model.name)


def run_step(ctx: RunContext, step: Step) -> None:
    """Run one stage and record it done (a made model is already in place when its record arrives)."""
    ctx.store.stage_start(step.key, step.stage, step.model)
    t0 = time.perf_counter()
    job = job_for(ctx, step)
    bar: Any = contextlib.nullcontext()
    if step.stage == "quantize" and job.variant.calibration is not None:  # RTN calibrates nothing
        from quantstudy.runtime.progress import calibration_progress

        bar = calibration_progress(ctx.console, f"{step.model} · calibrated layers", decoder_layers(Path(job.model.path)))
    with bar:
        artifact = drive(ctx, job, step.key)
    step.seconds = time.perf_counter() - t0
    ctx.store.stage_finish(step.key, artifact, {"seconds": step.seconds})


def _model(ctx: RunContext, name: str) -> ModelRecord:
    rec = ctx.store.model(name)
    assert rec is not None, f"stage order: model {name} has not been produced yet"
    return rec


def run_study(ctx: RunContext, formats: set[str] | None = None) -> list[Step]:
    """The whole recipe: every stage not yet done, then the report."""
    steps = run_stages(ctx)
    from quantstudy.report import write_report

    paths = write_report(ctx.store, ctx.study_dir, formats or {"md", "html", "json"})
    ctx.console.print("report: " + ", ".join(str(p) for p in paths), soft_wrap=True)
    return steps


def run_stages(ctx: RunContext, stages: set[str] | None = None, only_model: str | None = None) -> list[Step]:
    """The stages of kinds `stages` (default all) not yet done, for `only_model` and what it is made from."""
    from quantstudy.errors import QuantStudyError

    environment.record(ctx)
    steps = plan(ctx)
    names = {s.model for s in steps}
    if only_model is not None and only_model not in names:
        raise QuantStudyError("no such model in this study", field="--model", value=only_model,
                              fix=f"use one of {sorted(names)}")
    needed = {only_model} if only_model else names
    for s in steps:
        if s.model in needed:
            needed.update(s.parents)
    execute(ctx, steps, lambda s: (stages is None or s.stage in stages) and s.model in needed)
    return steps


def execute(ctx: RunContext, steps: list[Step], wanted: Callable[[Step], bool] = lambda s: True) -> None:
    """Run the wanted stages not yet done, in order: each with its library output in its own log file,
    a start line, progress, and a finish line with its time and headline result."""
    from quantstudy.runtime.progress import Heartbeat, clock, headline

    out, con = ctx.output, ctx.console
    migrate_keys(ctx, steps)
    chosen = [s for s in steps if wanted(s)]
    todo = [s for s in chosen if not s.cached]
    con.print(f"[bold]{ctx.cfg.name}[/]: {len(chosen)} stages, {len(chosen) - len(todo)} cached, {len(todo)} to run")
    for stage in dict.fromkeys(s.stage for s in chosen):  # the stage list: one line per kind of stage
        models = [f"{s.model}{' (cached)' if s.cached else ''}" for s in chosen if s.stage == stage]
        con.print(f"  {stage}: {', '.join(models)}", highlight=False, soft_wrap=True)
    if ctx.ray_address:  # the same stages as Ray tasks, in DAG order; this process still writes the store
        from quantstudy.runtime.cluster import execute_ray

        def started(s: Step) -> None:
            ctx.store.stage_start(s.key, s.stage, s.model)
            con.print(f"[bold]{s.stage} {s.model}[/] started", highlight=False)

        def finished(s: Step, artifact: str | None, where: dict) -> None:
            ctx.store.stage_finish(s.key, artifact, {"seconds": s.seconds, **where})
            con.print(f"[green]{s.stage} {s.model} done[/] in {clock(s.seconds or 0)} on {where.get('node', '?')}: "
                      f"{headline(ctx.store, s.stage, s.model)}", highlight=False, soft_wrap=True)

        execute_ray(ctx, steps, wanted, ctx.ray_address, started, finished)
        return
    for i, s in enumerate(steps, 1):
        # re-checked here: re-making a model invalidates the stages computed on its old weights
        if not wanted(s) or is_done(ctx, s):
            continue
        s.cached = False
        label = f"[{i}/{len(steps)}] {s.stage} {s.model}"
        con.print(f"[bold]{label}[/] ...", highlight=False)
        log = ctx.study_dir / "logs" / f"{s.stage}-{s.model}.log"
        t0 = time.perf_counter()
        try:
            with (out.capture(log) if out is not None else contextlib.nullcontext()), Heartbeat(con, label):
                run_step(ctx, s)
        except BaseException:
            if out is not None:
                con.print(f"[red]{label} failed[/] after {clock(time.perf_counter() - t0)}; the libraries' output "
                          f"is in {log}", highlight=False, soft_wrap=True)
            raise
        con.print(f"[green]{label} done[/] in {clock(s.seconds or 0)}: {headline(ctx.store, s.stage, s.model)}",
                  highlight=False, soft_wrap=True)
