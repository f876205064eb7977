"""Named fail points, so tests can SIGKILL a real run at an exact moment.

`failpoint("save-model")` does nothing unless the environment variable QS_FAILPOINT names
that point; then the process kills itself with SIGKILL (no cleanup, no finally blocks),
exactly like an OOM killer or a pulled plug. Production runs never set the variable.
With QS_FAILPOINT_ONCE=<file> as well, only the first process to reach the point dies (it
creates the file first): a retried attempt, e.g. Ray's re-run of a killed task, gets through.
"""

from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    if os.environ.get("QS_FAILPOINT") != name:
        return
    once = os.environ.get("QS_FAILPOINT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))  # atomic: one process wins
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
