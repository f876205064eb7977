"""The study recipe, top to bottom: model -> [train] -> quantize -> evaluate -> fidelity -> report.

Each stage's output is cached in the store under a key that hashes everything that can
change it (model content, settings, data sample ids, library versions). A stage whose key
is recorded `done` is skipped, so a re-run computes only what changed and a killed run
resumes where it stopped (artifacts are renamed into place before `done` is recorded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from quantstudy.runtime import environment
from quantstudy.data.calibration import check_held_out
from quantstudy.config import LMEvalTaskSpec
from quantstudy.runtime.context import RunContext
from quantstudy.stages.resolve import (SourceKind, check_model_dir, classify, file_sha256, builtin_gguf,
                               resolve_source, weights_hash, weights_size)
from quantstudy.store import ModelRecord
from quantstudy.config.variants import Variant, expand_variants

BASE, TRAINED = "base", "trained"


def key_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class Step:
    stage: str  # resolve | train | quantize | evaluate | measure | fidelity | report
    model: str
    key: str
    cached: bool = False
    seconds: float | None = None
    note: str = ""
    parents: list[str] = field(default_factory=list)


def source_fingerprint(ctx: RunContext) -> str:
    """Identity of the baseline weights, cheap enough to compute at every plan."""
    m, base = ctx.cfg.model, ctx.config_dir
    kind = classify(m.source, base)
    if kind == SourceKind.builtin:
        return key_of("builtin", m.source, file_sha256(builtin_gguf(m.source)))
    if kind == SourceKind.gguf:
        p = Path(m.source) if Path(m.source).is_absolute() else base / m.source
        return key_of("gguf", file_sha256(p) if p.is_file() else str(p))
    if kind == SourceKind.local:
        p = Path(m.source) if Path(m.source).is_absolute() else base / m.source
        check_model_dir(p)
        # name/size/mtime of the weight files: hashing 8 GB at every plan would cost ~30 s
        files = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in p.iterdir() if f.is_file())
        return key_of("local", str(p.resolve()), files)
    return key_of("hub", m.source, m.revision or "main")


def lmeval_plan_check(spec: LMEvalTaskSpec, config_dir: Path, trust: bool) -> str:
    from quantstudy.tasks.lmeval_load import plan_check  # imports lm-eval: only for studies that use it

    return plan_check(spec, config_dir, trust)


def plan(ctx: RunContext) -> list[Step]:
    """The ordered list of stages the study needs, each marked cached or to run."""
    cfg, store, versions = ctx.cfg, ctx.store, environment.versions()
    variants = expand_variants(cfg)
    check_held_out(cfg, [(f"quantize: {v.name}: calibration.source", v.calibration) for v in variants
                         if v.calibration is not None], offline=ctx.data_dir is not None)
    steps = [Step("resolve", BASE, key_of("resolve", source_fingerprint(ctx), m_dtype(ctx)))]
    # model-level chat template variables and reasoning markers shape what later stages render and
    # score; they join those keys only when set, so keys of studies that predate them do not change
    tpl = [cfg.model.chat_template_kwargs] if cfg.model.chat_template_kwargs else []
    think = list(cfg.model.think_markers_changed() or [])
    roots = [(BASE, steps[0].key)]
    # lm-eval tasks (#20): found, trusted and their data reachable, checked now (plan time); their user
    # YAML, code and data files join the evaluate key only when such tasks are listed
    lmeval = [lmeval_plan_check(s, ctx.config_dir, cfg.evaluate.trust_task_code)
              for s in (cfg.evaluate.lmeval_specs() if cfg.evaluate else [])]
    if cfg.train is not None:
        steps.append(Step("train", TRAINED, key_of("train", steps[0].key, cfg.train, versions, *tpl), parents=[BASE]))
        roots.append((TRAINED, steps[-1].key))
    for root, root_key in roots:
        for v in variants:
            name = v.name if root == BASE else f"{TRAINED}-{v.name}"
            steps.append(Step("quantize", name, key_of("quantize", root_key, v, versions, *tpl), parents=[root]))
    model_keys = {s.model: s.key for s in steps}
    parent_of = {s.model: s.parents[0] for s in steps if s.parents}
    for name, mkey in list(model_keys.items()):
        if cfg.evaluate is not None:
            steps.append(Step("evaluate", name, key_of("evaluate", mkey, cfg.evaluate, ctx.data_id, versions,
                                                       *tpl, *think, *lmeval)))
            if cfg.evaluate.speed is not None:
                # a derived model is measured paired with its parent (same window, interleaved)
                parent = parent_of.get(name)
                pair = [model_keys[parent]] if parent else []
                # "paired": figures measured before the paired, packed-kernel method are not reused
                # a root's key also says its bf16/float32 pairing is recorded (speed.bf16_vs_float32)
                steps.append(Step("measure", name, key_of("measure", "paired", mkey, cfg.evaluate.speed, versions,
                                                          *tpl, *(pair or ["bf16-vs-float32"])),
                                  parents=[parent] if parent else []))
    if cfg.fidelity is not None:
        for s in [s for s in steps if s.stage == "quantize"]:
            parent = s.parents[0]
            steps.append(Step("fidelity", s.model, key_of("fidelity", s.key, model_keys[parent], cfg.fidelity,
                                                           cfg.evaluate, ctx.data_id, versions), parents=[parent]))
    for s in steps:
        s.cached = is_done(ctx, s)
    return steps


def is_done(ctx: RunContext, step: Step) -> bool:
    """Done = recorded done under this key, and its artifact (if any) still on disk."""
    done = ctx.store.stage_done(step.key)
    return done is not None and (not done.get("artifact") or Path(done["artifact"]).exists())


def m_dtype(ctx: RunContext) -> str:
    return ctx.cfg.model.dtype.value


def variant_of(ctx: RunContext, name: str) -> Variant:
    plain = name.removeprefix(f"{TRAINED}-")
    return next(v for v in expand_variants(ctx.cfg) if v.name == plain)


def run_step(ctx: RunContext, step: Step) -> None:
    """Run one stage and record it done (the artifact is already in place when it returns)."""
    store, models_dir = ctx.store, ctx.study_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    store.stage_start(step.key, step.stage, step.model)
    t0 = time.perf_counter()
    artifact: str | None = None
    if step.stage == "resolve":
        path = resolve_source(ctx.cfg.model.source, ctx.cfg.model.revision, ctx.config_dir, models_dir)
        rec = ModelRecord(BASE, "baseline", str(path), spec={"source": ctx.cfg.model.source,
                          "kind": classify(ctx.cfg.model.source, ctx.config_dir).value, "describe": "baseline"},
                          size_bytes=weights_size(path), weights_hash=weights_hash(path),
                          versions=environment.versions())
        _replace_model(ctx, rec, step.key)
        artifact = str(path)
    elif step.stage == "train":
        from quantstudy.stages.train import train_model

        rec = train_model(ctx, _model(ctx, step.parents[0]), models_dir / TRAINED)
        rec.name, rec.size_bytes = TRAINED, weights_size(Path(rec.path))
        rec.weights_hash, rec.versions = weights_hash(Path(rec.path)), environment.versions()
        _replace_model(ctx, rec, step.key)
        artifact = rec.path
    elif step.stage == "quantize":
        from quantstudy.runtime.progress import calibration_progress
        from quantstudy.stages.quantize import quantize_model

        v, parent = variant_of(ctx, step.model), _model(ctx, step.parents[0])
        bar = (calibration_progress(ctx.console, f"{step.model} · calibrated layers", _layers(parent))
               if v.calibration is not None else contextlib.nullcontext())  # RTN calibrates nothing
        with bar:
            rec = quantize_model(ctx, v, parent, step.model, models_dir / step.model)
        _replace_model(ctx, rec, step.key)
        artifact = rec.path
    elif step.stage == "evaluate":
        from quantstudy.stages.evaluate import evaluate_model

        evaluate_model(ctx, _model(ctx, step.model))
    elif step.stage == "measure":
        from quantstudy.stages.measure import measure_model

        measure_model(ctx, _model(ctx, step.model), _model(ctx, step.parents[0]) if step.parents else None)
    elif step.stage == "fidelity":
        from quantstudy.stages.fidelity import fidelity_model

        fidelity_model(ctx, _model(ctx, step.model), _model(ctx, step.parents[0]))
    step.seconds = time.perf_counter() - t0
    store.stage_finish(step.key, artifact, {"seconds": step.seconds})


def _layers(rec: ModelRecord) -> int:
    """Decoder layers of a model directory (its config.json; a multimodal config nests them)."""
    cfg = json.loads((Path(rec.path) / "config.json").read_text())
    return int(cfg.get("text_config", cfg).get("num_hidden_layers", 0))


def _model(ctx: RunContext, name: str) -> ModelRecord:
    rec = ctx.store.model(name)
    assert rec is not None, f"stage order: model {name} has not been produced yet"
    return rec


def _replace_model(ctx: RunContext, rec: ModelRecord, key: str) -> None:
    """A model made anew invalidates every result computed on its previous weights."""
    old = ctx.store.model(rec.name)
    rec.spec = {**rec.spec, "stage_key": key}
    if old is not None and old.weights_hash != rec.weights_hash:
        ctx.store.forget_results(rec.name)
    ctx.store.put_model(rec)


def run_study(ctx: RunContext, formats: set[str] | None = None) -> list[Step]:
    environment.record(ctx)
    steps = plan(ctx)
    execute(ctx, steps)
    from quantstudy.report import write_report

    paths = write_report(ctx.store, ctx.study_dir, formats or {"md", "html", "json"})
    ctx.console.print("report: " + ", ".join(str(p) for p in paths), soft_wrap=True)
    return steps


def execute(ctx: RunContext, steps: list[Step], wanted: Callable[[Step], bool] = lambda s: True) -> None:
    """Run the wanted stages not yet done, in order: each with its library output in its own log file,
    a start line, progress, and a finish line with its time and headline result."""
    from quantstudy.runtime.progress import Heartbeat, clock, headline

    out, con = ctx.output, ctx.console
    chosen = [s for s in steps if wanted(s)]
    todo = [s for s in chosen if not s.cached]
    con.print(f"[bold]{ctx.cfg.name}[/]: {len(chosen)} stages, {len(chosen) - len(todo)} cached, {len(todo)} to run")
    for stage in dict.fromkeys(s.stage for s in chosen):  # the stage list: one line per kind of stage
        models = [f"{s.model}{' (cached)' if s.cached else ''}" for s in chosen if s.stage == stage]
        con.print(f"  {stage}: {', '.join(models)}", highlight=False, soft_wrap=True)
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
