"""One writer per study directory: an advisory flock, released by the OS if the holder dies.

A second `quantstudy` process on the same study refuses at once with the holder's pid,
host and start time, instead of interleaving writes (SQLite would survive that, but two
processes quantizing the same variant would waste hours and race on the rename).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from quantstudy.errors import QuantStudyError


@contextlib.contextmanager
def study_lock(study_dir: Path) -> Iterator[None]:
    path = study_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            raise QuantStudyError(
                f"study directory {study_dir} is in use by pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} (started {since}, command: {holder.get('argv', '?')})",
                fix="wait for that run to finish, or stop it; its finished work is kept") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "argv": " ".join(os.sys.argv)}).encode())
        os.fsync(fd)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
