"""Named fail points, so tests can SIGKILL a real run at an exact moment.

`failpoint("save-model")` does nothing unless the environment variable QS_FAILPOINT names
that point; then the process kills itself with SIGKILL (no cleanup, no finally blocks),
exactly like an OOM killer or a pulled plug. Production runs never set the variable.
"""

from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    if os.environ.get("QS_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
