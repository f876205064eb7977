"""Library output goes, complete, to one log file per stage and model; the console keeps the progress.

llm-compressor (loguru, METRIC lines at level 38), transformers and datasets (python logging,
tqdm bars), python warnings, and C code all write to the process's file descriptors 1 and 2.
Filtering each library by hand misses some (a new tqdm bar, a C-level warning), so a stage
runs with fds 1 and 2 redirected (os.dup2) into `<study>/logs/<stage>-<model>.log`; the
console writes to a duplicate of the original stdout made before any redirection. A child
process (the speed benchmark's spawned interpreter) inherits the redirected fds, so its
output lands in the same file. `--verbose` copies the same bytes to the terminal live.

Where sys.stdout has no file descriptor (typer's CliRunner in tests), the same redirection
is done at the Python level: library output in Python still goes to the log.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterator

from rich.console import Console

# llm-compressor's own loguru sink (installed when it is first imported) logs at this level;
# its INFO lines (one per module, per step) are what it prints by default, so the log keeps them.
LIBRARY_LOG_LEVEL = "INFO"


def _real_fds() -> bool:
    """True when sys.stdout/sys.stderr are the process's fds 1 and 2 (a terminal, pipe or file)."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


class Output:
    """The terminal side of a run (progress console) and the log side (library output per stage)."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.fd_level = _real_fds()
        if self.fd_level:
            sys.stdout.flush()
            # a duplicate of the original stdout: still the terminal/pipe while fd 1 points at a log
            self.term: IO[str] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        else:
            self.term = sys.stdout
        self.console = Console(file=self.term, highlight=False)
        quiet_loguru(verbose)

    @property
    def is_terminal(self) -> bool:
        return self.console.is_terminal

    @contextlib.contextmanager
    def capture(self, path: Path) -> Iterator[Path]:
        """Everything written to stdout/stderr inside goes to `path` (appended: a resumed stage
        keeps the earlier attempt's log above a header line)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        with open(path, "ab", buffering=0) as f:
            f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {path.stem} (pid {os.getpid()})\n".encode())
            _loguru_to_stderr(LIBRARY_LOG_LEVEL)
            try:
                if self.fd_level:
                    with _fds_into(f.fileno(), self.term if self.verbose else None):
                        yield path
                else:
                    text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", write_through=True)
                    try:
                        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                            yield path
                    finally:
                        text.detach()  # the file itself is closed by the outer `with`
            finally:
                quiet_loguru(self.verbose)


@contextlib.contextmanager
def _fds_into(log_fd: int, tee: IO[str] | None) -> Iterator[None]:
    """Point fds 1 and 2 at the log (through a pipe copied to `tee` as well, when given)."""
    saved = os.dup(1), os.dup(2)
    pump = None
    if tee is None:
        target = log_fd
    else:
        r, target = os.pipe()
        pump = threading.Thread(target=_copy, args=(r, log_fd, tee), daemon=True)
        pump.start()
    os.dup2(target, 1)
    os.dup2(target, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        if pump is not None:
            os.close(target)  # the pump sees end-of-file once no process holds the write end
            pump.join(timeout=5)


def _copy(r: int, log_fd: int, tee: IO[str]) -> None:
    with os.fdopen(r, "rb", buffering=0) as src:
        while chunk := src.read(65536):
            os.write(log_fd, chunk)
            tee.write(chunk.decode("utf-8", errors="replace"))
            tee.flush()


def _loguru_to_stderr(level: str) -> None:
    """One loguru sink that looks sys.stderr up at each write (so it follows any redirection)."""
    from loguru import logger

    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", LIBRARY_LOG_LEVEL)  # read by llm-compressor at import
    logger.remove()
    logger.add(lambda m: sys.stderr.write(m), level=level,
               format="{time:HH:mm:ss} | {name} | {level} | {message}")


def quiet_loguru(verbose: bool) -> None:
    """Between stages: only warnings reach the terminal (all INFO with --verbose). Also undoes the
    console sink llm-compressor installs when imported, which would otherwise outlive the stage."""
    _loguru_to_stderr("INFO" if verbose else "WARNING")
