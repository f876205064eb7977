"""The console's progress view: the stage list, the running stage's progress, one line per finished stage.

On a terminal the stages' bars are rich progress bars (elapsed and remaining time), cleared
when the stage ends. Elsewhere (a pipe, CI, nohup) a live bar cannot redraw, so a stage
writes a plain line at most every PLAIN_EVERY_S seconds. Either way each finished stage
gets one line with its time and its headline result, read back from the store.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from quantstudy.store import Store

# seconds between plain progress lines of one stage; env override for CI logs that want more or fewer
PLAIN_EVERY_S = float(os.environ.get("QUANTSTUDY_PROGRESS_SECONDS", "30"))


def make_progress(console: Console) -> Progress | PlainProgress:
    """A drop-in for rich's `Progress(*columns, console=...)` in the stages: rich bars with an ETA on a
    terminal (cleared when done: the stage's finish line replaces them), plain timed lines elsewhere."""
    if console.is_terminal:
        return _Bars(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     TextColumn("left"), TimeRemainingColumn(), console=console, transient=True)
    return PlainProgress(console)


class _Bars(Progress):
    """rich bars that tell the heartbeat the stage is showing progress of its own."""

    def update(self, *args: Any, **kw: Any) -> None:
        _last_line[0] = time.monotonic()
        super().update(*args, **kw)

    def advance(self, *args: Any, **kw: Any) -> None:
        _last_line[0] = time.monotonic()
        super().advance(*args, **kw)


class PlainProgress:
    """The subset of rich.Progress the stages use, printing `  label: done/total (x%), elapsed, ~left`
    lines at most every PLAIN_EVERY_S seconds across all of its bars."""

    def __init__(self, console: Console):
        self.console, self.bars, self.last = console, {}, time.monotonic()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        pass  # the stage's finish line follows

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> TaskID:
        tid = TaskID(len(self.bars))
        # (description, total, completed, completed at start, start time): the ETA uses this run's rate only
        self.bars[tid] = [description, total, completed, completed, time.monotonic()]
        return tid

    def advance(self, tid: TaskID, advance: float = 1) -> None:
        self.update(tid, completed=self.bars[tid][2] + advance)

    def update(self, tid: TaskID, *, completed: float | None = None, total: float | None = None,
               description: str | None = None, advance: float | None = None, **_fields: Any) -> None:
        bar = self.bars[tid]
        if description is not None:
            bar[0] = description
        if total is not None:
            bar[1] = total
        if advance is not None:
            bar[2] += advance
        if completed is not None:
            bar[2] = completed
        now = time.monotonic()
        if now - max(self.last, _last_line[0]) >= PLAIN_EVERY_S:
            self.last = _last_line[0] = now
            self.console.print("  " + plain_line(*bar, now=now), highlight=False, soft_wrap=True)


_last_line = [0.0]  # monotonic time of the last plain progress line, shared with the heartbeat


@contextlib.contextmanager
def calibration_progress(console: Console, label: str, layers: int) -> Iterator[None]:
    """A bar over llm-compressor's sequential calibration: one step per calibrated subgraph (a decoder
    layer; the last one holds the final norm and head, hence layers + 1).

    llm-compressor shows this only as a tqdm bar per subgraph, which goes to the stage's log file; its
    public lifecycle event `LifecycleCallbacks.sequential_epoch_end` fires once per subgraph after
    that subgraph is calibrated and compressed, so we count its calls for the duration of the stage."""
    from llmcompressor.core import LifecycleCallbacks

    raw = LifecycleCallbacks.__dict__["sequential_epoch_end"]  # the classmethod object, restored as is
    original = LifecycleCallbacks.sequential_epoch_end
    with make_progress(console) as prog:
        bar = prog.add_task(label, total=layers + 1)

        def counted(*args: Any, **kw: Any) -> Any:
            out = original(*args, **kw)
            prog.advance(bar)
            return out

        LifecycleCallbacks.sequential_epoch_end = counted  # type: ignore[method-assign]
        try:
            yield
        finally:
            LifecycleCallbacks.sequential_epoch_end = raw  # type: ignore[method-assign]


class Heartbeat:
    """`  <label>: running, <elapsed>` when a stage showed no progress for 2 x PLAIN_EVERY_S
    (llm-compressor's calibration and the GGUF conversion report none that we can read)."""

    def __init__(self, console: Console, label: str):
        self.console, self.label, self.t0 = console, label, time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Heartbeat:
        _last_line[0] = self.t0
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)

    def _run(self) -> None:
        while not self.stop.wait(PLAIN_EVERY_S / 3):
            now = time.monotonic()
            if now - _last_line[0] >= 2 * PLAIN_EVERY_S:
                _last_line[0] = now
                self.console.print(f"  {self.label}: running, {clock(now - self.t0)}", highlight=False)


def plain_line(desc: str, total: float | None, done: float, done0: float, t0: float, now: float) -> str:
    elapsed = now - t0
    if not total:
        return f"{desc}: {done:g} done, {clock(elapsed)}"
    rate = (done - done0) / elapsed if elapsed > 0 else 0.0
    left = f", ~{clock((total - done) / rate)} left" if rate > 0 and done < total else ""
    return f"{desc}: {done:g}/{total:g} ({100 * done / total:.0f}%), {clock(elapsed)}{left}"


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s} s" if s < 90 else f"{s // 60} min {s % 60:02d} s" if s < 5400 else f"{s // 3600} h {s % 3600 // 60:02d} min"


# --------------------------------------------------------------------------- headlines
def headline(store: Store, stage: str, model: str) -> str:
    """The one result a user wants to see when the stage finishes (what the report will lead with)."""
    m = {name: value for _, name, value, _ in store.metrics(model)}
    if stage == "quantize":
        errs = [e for _, e, _ in store.layers(model) if e is not None]
        return (f"mean layer error {sum(errs) / len(errs):.4g} over {len(errs)} layers (llm-compressor)" if errs
                else "no per-layer errors reported (RTN has no calibration error)")
    if stage == "train":
        loss = m.get("train.final_loss")
        return f"final training loss {loss:.4f}" if loss is not None else ""
    if stage == "evaluate":
        return " · ".join(_task_headline(m, task) for task in
                          dict.fromkeys(n.split(".")[1] for n in m if n.startswith("eval.")))
    if stage == "measure":
        parts = []
        if (tps := m.get("speed.tokens_per_s")) is not None:
            parts.append(f"{tps:.1f} tokens/s")
        if (peak := m.get("memory.peak_bytes")) is not None:
            parts.append(f"peak memory {peak / 2**20:.0f} MiB")
        return ", ".join(parts)
    if stage == "fidelity":
        kl, agree = m.get("fidelity.kl_mean"), m.get("fidelity.top1_agree")
        return f"mean KL {kl:.4f} nats/token (a lower bound), top-1 agreement {agree:.1%}" if kl is not None \
            and agree is not None else ""
    if stage == "resolve":
        rec = store.model(model)
        return f"{rec.size_bytes / 2**20:.0f} MiB of weights" if rec is not None and rec.size_bytes else ""
    return ""


def _task_headline(m: dict[str, float | None], task: str) -> str:
    n = m.get(f"eval.{task}.n")
    tail = f" (n={n:.0f})" if n is not None else ""
    for key, label in (("acc", "acc"), ("f1", "f1"), ("word_perplexity", "word ppl")):
        value = m.get(f"eval.{task}.{key}")
        if value is not None:
            return f"{task} {label} {value:.3g}{tail}"
    # an lm-eval task names its own metrics (e.g. "exact_match,strict-match"): its first one, as lm-eval lists it
    own = next(((k.split(".", 2)[2], v) for k, v in m.items()
                if k.startswith(f"eval.{task}.") and k != f"eval.{task}.n" and v is not None), None)
    return f"{task} {own[0]} {own[1]:.3g}{tail}" if own else task
