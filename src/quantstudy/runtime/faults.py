"""Named fail points, so tests can SIGKILL a real run at an exact moment.

`failpoint("save-model")` does nothing unless the environment variable QS_FAILPOINT names
that point; then the process kills itself with SIGKILL (no cleanup, no finally blocks),
exactly like an OOM killer or a pulled plug. Production runs never set the variable.
With QS_FAILPOINT_ONCE=<file> as well, only the first process to reach the point dies (it
creates the file first): a retried attempt, e.g. Ray's re-run of a killed task, gets through.
With QS_FAILPOINT_PAUSE=1 the process instead writes its pid into that file and waits until its
parent dies (a Ray worker whose node a test removes), then exits: a task caught mid-stage.
"""

from __future__ import annotations

import os
import signal
import time


def failpoint(name: str) -> None:
    if os.environ.get("QS_FAILPOINT") != name:
        return
    once = os.environ.get("QS_FAILPOINT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))  # atomic: one process wins
        except FileExistsError:
            return
    if os.environ.get("QS_FAILPOINT_PAUSE") and once:
        with open(once, "w") as f:
            f.write(str(os.getpid()))
        parent = os.getppid()
        while os.getppid() == parent:  # until the node under this worker is gone
            time.sleep(0.1)
        os._exit(1)
    os.kill(os.getpid(), signal.SIGKILL)
