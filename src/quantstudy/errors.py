"""One exception type for everything a user can fix.

The CLI prints `QuantStudyError` as a single message (no traceback unless --debug),
so every raise site must say *what* is wrong, *which value* and *how to fix it*.
"""

from __future__ import annotations


class QuantStudyError(Exception):
    """A problem the user can fix: bad config, missing file, impossible setting."""

    def __init__(self, what: str, *, fix: str = "", field: str | None = None, value: object = None):
        self.what, self.fix, self.field, self.value = what, fix, field, value
        parts = []
        if field is not None:
            parts.append(f"{field}: ")
        parts.append(what)
        if value is not None:
            parts.append(f" (got {value!r})")
        if fix:
            parts.append(f". Fix: {fix}")
        super().__init__("".join(parts))
