"""Command line: `quantstudy run | plan | quantize | evaluate | report`.

Every user-fixable problem is a QuantStudyError, printed as one red line with exit code 2;
a traceback only with --debug. Commands that write take the study lock first.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from quantstudy.errors import QuantStudyError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reproducible post-training quantization studies with honest statistics.")
console = Console(stderr=False)
FORMATS = {"md", "html", "json"}

DataDir = typer.Option(None, "--data-dir", help="offline raw data (layout of ../shared/data); overrides data_dir")
Debug = typer.Option(False, "--debug", help="show full tracebacks")


@contextlib.contextmanager
def friendly_errors(debug: bool) -> Iterator[None]:
    try:
        yield
    except QuantStudyError as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages and scored items are kept; run again to resume")
        raise typer.Exit(130) from None
    except OSError as e:
        if debug:
            raise
        import errno

        fix = "free disk space, then run again: finished work is kept" if e.errno == errno.ENOSPC else \
            "check the path and its permissions"
        console.print(f"[bold red]error:[/] {e.strerror or e} ({getattr(e, 'filename', '') or ''}). Fix: {fix}")
        raise typer.Exit(2) from None


def quiet_library_logs(debug: bool) -> None:
    """llm-compressor logs every step at INFO through loguru; keep warnings (all with --debug).
    The sink looks up sys.stderr at each write, so a swapped stream (tests, pipes) stays valid."""
    from loguru import logger

    # llm-compressor re-installs its own console sink when it is used; it reads this variable
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "DEBUG" if debug else "WARNING")
    logger.remove()
    logger.add(lambda m: sys.stderr.write(m), level="DEBUG" if debug else "WARNING",
               format="{time:HH:mm:ss} | {level} | {message}")


@contextlib.contextmanager
def open_study(config: Path, data_dir: Optional[Path], debug: bool, lock: bool = True) -> Iterator[object]:
    from quantstudy.config import load_config, study_dir
    from quantstudy.context import RunContext
    from quantstudy.environment import resolve_device
    from quantstudy.lock import study_lock
    from quantstudy.store import Store

    quiet_library_logs(debug)
    cfg = load_config(config)
    sdir = study_dir(cfg, config)
    cdir = config.resolve().parent
    ddir = data_dir or (Path(cfg.data_dir) if cfg.data_dir else None)
    if ddir is not None:
        ddir = ddir if ddir.is_absolute() else (Path.cwd() if data_dir else cdir) / ddir
        if not ddir.is_dir():
            raise QuantStudyError("data directory not found", field="--data-dir" if data_dir else "data_dir",
                                  value=str(ddir), fix="point it at a folder laid out like ../shared/data, "
                                  "or remove it to read datasets from the Hugging Face hub")
    device = resolve_device(cfg.device.value)
    sdir.mkdir(parents=True, exist_ok=True)
    with (study_lock(sdir) if lock else contextlib.nullcontext()), Store(sdir / "store.sqlite") as store:
        yield RunContext(cfg, sdir, cdir, store, ddir, device, console, debug)


@app.command()
def plan(config: Path, data_dir: Optional[Path] = DataDir, debug: bool = Debug) -> None:
    """Print the expanded plan (variants, cached stages, what will run) without running anything."""
    from quantstudy.study import plan as make_plan

    with friendly_errors(debug), open_study(config, data_dir, debug, lock=False) as ctx:
        from quantstudy.variants import expand_variants

        vt = Table("variant", "method", "calibration", title=f"{ctx.cfg.name}: variants")
        for v in expand_variants(ctx.cfg):
            c = v.calibration
            vt.add_row(v.name, v.describe(), "-" if c is None else f"{c.samples} x <= {c.max_seq_len} tokens, "
                       f"{c.source.value}, seed {c.seed}")
        console.print(vt)
        st = Table("#", "stage", "model", "status", title="stages")
        steps = make_plan(ctx)
        for i, s in enumerate(steps, 1):
            st.add_row(str(i), s.stage, s.model, "[green]cached[/]" if s.cached else "[yellow]will run[/]")
        console.print(st)
        console.print(f"study directory: {ctx.study_dir}; device: {ctx.device}; data: {ctx.data_id}")


@app.command()
def run(config: Path, data_dir: Optional[Path] = DataDir, fmt: str = typer.Option("md,html,json", "--format"),
        debug: bool = Debug) -> None:
    """Run the whole study (cached stages are skipped) and write the report."""
    from quantstudy.study import run_study

    formats = parse_formats(fmt)
    with friendly_errors(debug), open_study(config, data_dir, debug) as ctx:
        steps = run_study(ctx, formats)
        summary(steps)


@app.command()
def quantize(config: Path, data_dir: Optional[Path] = DataDir, debug: bool = Debug) -> None:
    """Run only the stages up to quantization (model source, training, every variant)."""
    with friendly_errors(debug), open_study(config, data_dir, debug) as ctx:
        summary(run_stages(ctx, {"resolve", "train", "quantize"}))


@app.command()
def evaluate(config: Path, model: Optional[str] = typer.Option(None, help="one model of the study (default: all)"),
             data_dir: Optional[Path] = DataDir, debug: bool = Debug) -> None:
    """Evaluate (and measure) the study's models; producing any missing model first."""
    with friendly_errors(debug), open_study(config, data_dir, debug) as ctx:
        summary(run_stages(ctx, {"resolve", "train", "quantize", "evaluate", "measure"}, only_model=model))


@app.command()
def report(study_dir: Path, fmt: str = typer.Option("md,html,json", "--format"), debug: bool = Debug) -> None:
    """Re-render the report from a study directory's store (computes nothing)."""
    from quantstudy.report import write_report
    from quantstudy.store import Store

    formats = parse_formats(fmt)
    with friendly_errors(debug):
        db = study_dir / "store.sqlite"
        if not db.is_file():
            raise QuantStudyError("no study store here", value=str(db),
                                  fix="pass the study's output directory (it holds store.sqlite)")
        with Store(db) as store:
            for p in write_report(store, study_dir, formats):
                console.print(f"wrote {p}")


def parse_formats(fmt: str) -> set[str]:
    chosen = {f.strip().lower() for f in fmt.split(",") if f.strip()}
    if not chosen or chosen - FORMATS:
        raise typer.BadParameter(f"unknown format(s) {sorted(chosen - FORMATS)}; use a comma list of md,html,json")
    return chosen


def run_stages(ctx: object, stages: set[str], only_model: str | None = None) -> list[object]:
    from quantstudy import environment
    from quantstudy.study import is_done, plan as make_plan, run_step

    environment.record(ctx)
    steps = make_plan(ctx)
    names = {s.model for s in steps}
    if only_model is not None and only_model not in names:
        raise QuantStudyError("no such model in this study", field="--model", value=only_model,
                              fix=f"use one of {sorted(names)}")
    needed = {only_model} if only_model else names
    for s in steps:
        if s.model in needed:
            needed.update(s.parents)
    for s in steps:
        if s.stage in stages and s.model in needed and not is_done(ctx, s):
            ctx.console.rule(f"{s.stage} {s.model}")
            run_step(ctx, s)
    return steps


def summary(steps: list[object]) -> None:
    t = Table("stage", "model", "result", "seconds", title="summary")
    for s in steps:
        t.add_row(s.stage, s.model, "cached" if s.cached else ("ran" if s.seconds is not None else "skipped"),
                  "" if s.seconds is None else f"{s.seconds:.1f}")
    console.print(t)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
