"""Command line: `quantstudy run | plan | quantize | evaluate | report`.

Every user-fixable problem is a QuantStudyError, printed as one red line with exit code 2;
a traceback only with --debug. Commands that write take the study lock first. The libraries'
output goes to <study>/logs/<stage>-<model>.log (live on the console too with --verbose).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quantstudy.errors import QuantStudyError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reproducible post-training quantization studies with honest statistics.")
console = Console(stderr=False)

DataDir = typer.Option(None, "--data-dir", help="offline raw data (layout of ../shared/data); overrides data_dir")
Debug = typer.Option(False, "--debug", help="show full tracebacks (nothing else changes)")
Verbose = typer.Option(False, "--verbose", "-v", help="show the libraries' output live (it always goes to "
                       "<study>/logs/<stage>-<model>.log)")


@contextlib.contextmanager
def friendly_errors(debug: bool) -> Iterator[None]:
    try:
        yield
    except QuantStudyError as e:
        if debug:
            raise
        # escaped: a message may quote `[a, b]` or a value in brackets, which rich would read as markup
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
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


@contextlib.contextmanager
def open_study(config: Path, data_dir: Optional[Path], debug: bool, lock: bool = True,
               verbose: bool = False, planning: bool = False) -> Iterator[object]:
    from quantstudy.config import load_config, study_dir
    from quantstudy.runtime.context import RunContext
    from quantstudy.runtime.environment import resolve_device
    from quantstudy.runtime.lock import study_lock
    from quantstudy.runtime.logs import Output
    from quantstudy.store import Store

    out = Output(verbose)  # before anything loads a library: it takes over loguru's console sink
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
    try:
        device = resolve_device(cfg.device.value)
    except QuantStudyError:
        if not planning:
            raise
        device = f"{cfg.device.value} (requested; not available on this machine: `run` will stop here)"
    store_path: Path | str = sdir / "store.sqlite"
    if planning and not Path(store_path).exists():
        store_path = ":memory:"  # `plan` writes nothing: a study not yet run has nothing cached, and no folder
    else:
        sdir.mkdir(parents=True, exist_ok=True)
    with (study_lock(sdir) if lock else contextlib.nullcontext()), Store(store_path) as store:
        yield RunContext(cfg, sdir, cdir, store, ddir, device, out.console, debug, out)


@app.command()
def plan(config: Path, data_dir: Optional[Path] = DataDir, debug: bool = Debug,
         pilot: Optional[Path] = typer.Option(None, "--pilot", help="a pilot study directory: plan items per task "
                                              "from its observed disagreement (parent vs variant)"),
         discordance: Optional[float] = typer.Option(None, "--discordance", min=0.0, max=1.0, help="plan items per "
                                                     "task from a stated share of items the variant answers differently")
         ) -> None:
    """Print the expanded plan (variants, cached stages, what will run) without running anything."""
    from quantstudy.runtime import estimate
    from quantstudy.study import plan as make_plan

    with friendly_errors(debug), open_study(config, data_dir, debug, lock=False, planning=True) as ctx:
        from quantstudy.config.variants import expand_variants

        vt = Table("variant", "method", "calibration", title=f"{ctx.cfg.name}: variants")
        for v in expand_variants(ctx.cfg):
            c = v.calibration
            vt.add_row(v.name, v.describe(), "-" if c is None else f"{c.samples} x <= {c.max_seq_len} tokens, "
                       f"{c.source.value}, seed {c.seed}")
        console.print(vt)
        steps = make_plan(ctx)
        secs = estimate.stage_seconds(ctx, steps)
        cols = ["#", "stage", "model", "status", "~time"]
        if ctx.cfg.cluster is not None:  # which stages a Ray run (`run --ray-address`) can start together
            from quantstudy.runtime.cluster_plan import waves

            cols.append("Ray round")
            rounds = waves(steps)
        st = Table(*cols, title="stages")
        for i, (s, sec) in enumerate(zip(steps, secs), 1):
            row = [str(i), s.stage, s.model, "[green]cached[/]" if s.cached else "[yellow]will run[/]",
                   "" if s.cached else estimate.rough(sec)]
            st.add_row(*row, *([str(rounds[i - 1])] if ctx.cfg.cluster is not None else []))
        console.print(st)
        if ctx.cfg.cluster is not None:
            console.print("Ray round: on a cluster with enough workers, stages of the same round run at the same "
                          "time; measure stages run one at a time, alone, after the rest", highlight=False)
        params, how = estimate.model_params(ctx)
        console.print(f"estimated run time: {estimate.rough(sum(secs))} for {sum(not s.cached for s in steps)} stage(s); "
                      f"model {params / 1e6:.0f}M parameters ({how}); {estimate.NOTE}", highlight=False)
        console.print(f"study directory: {ctx.study_dir}; device: {ctx.device}; data: {ctx.data_id}")
        from quantstudy.stages.resolve import hub_needs

        needs = hub_needs(ctx.cfg.model.source, ctx.cfg.model.revision, ctx.config_dir, ctx.data_dir)
        if needs:  # plan works offline; say what `run` will need the hub for, before it gets there
            console.print("[yellow]needs the Hugging Face hub:[/] " + "; ".join(needs) + ". Offline (HF_HUB_OFFLINE=1 "
                          "or no network) `run` stops at the first stage that needs it and names it; fix: download "
                          "once where the hub is reachable, or use a local model directory / .gguf and data_dir")
        if pilot is not None or discordance is not None:  # items needed for the decision (report/decide.py)
            from quantstudy.report.decide import print_plan

            print_plan(console, ctx.cfg, pilot, discordance)


@app.command()
def run(config: Path, data_dir: Optional[Path] = DataDir, fmt: str = typer.Option("md,html,json", "--format"),
        debug: bool = Debug, verbose: bool = Verbose,
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="run the stages as Ray tasks on this "
                                                  "cluster: auto, HOST:PORT or ray://... (default: $RAY_ADDRESS, "
                                                  "else in this process)")) -> None:
    """Run the whole study (cached stages are skipped) and write the report."""
    from quantstudy.runtime.cluster_plan import ray_address as address_of
    from quantstudy.study import run_study

    formats = parse_formats(fmt)
    with friendly_errors(debug), open_study(config, data_dir, debug, verbose=verbose) as ctx:
        ctx.ray_address = address_of(ray_address)
        t0 = time.perf_counter()
        summary(ctx, run_study(ctx, formats), time.perf_counter() - t0)


@app.command()
def quantize(config: Path, data_dir: Optional[Path] = DataDir, debug: bool = Debug,
             verbose: bool = Verbose) -> None:
    """Run only the stages up to quantization (model source, training, every variant)."""
    with friendly_errors(debug), open_study(config, data_dir, debug, verbose=verbose) as ctx:
        t0 = time.perf_counter()
        from quantstudy.study import run_stages

        summary(ctx, run_stages(ctx, {"resolve", "train", "quantize"}), time.perf_counter() - t0)


@app.command()
def evaluate(config: Path, model: Optional[str] = typer.Option(None, help="one model of the study (default: all)"),
             data_dir: Optional[Path] = DataDir, debug: bool = Debug, verbose: bool = Verbose) -> None:
    """Evaluate (and measure) the study's models; producing any missing model first."""
    with friendly_errors(debug), open_study(config, data_dir, debug, verbose=verbose) as ctx:
        t0 = time.perf_counter()
        from quantstudy.study import run_stages

        summary(ctx, run_stages(ctx, {"resolve", "train", "quantize", "evaluate", "measure"}, only_model=model),
                time.perf_counter() - t0)


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
    from quantstudy.report import FORMATS  # the one list of report formats

    chosen = {f.strip().lower() for f in fmt.split(",") if f.strip()}
    if not chosen or chosen - set(FORMATS):
        raise typer.BadParameter(f"unknown format(s) {sorted(chosen - set(FORMATS))}; use a comma list of "
                                 f"{','.join(FORMATS)}")
    return chosen


def summary(ctx: object, steps: list[object], seconds: float) -> None:
    """One closing line: each finished stage already printed its time and headline."""
    from quantstudy.runtime.progress import clock

    ran = sum(s.seconds is not None for s in steps)
    ctx.console.print(f"{ran} stage(s) ran, {sum(s.cached for s in steps)} cached; {clock(seconds)} in all; "
                      f"library logs in {ctx.study_dir / 'logs'}", highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
