"""The report as a list of format-neutral blocks, and the number formats every renderer shares.

Sections build blocks once; markdown.py and html.py only lay them out, so the two formats
can never disagree on a number. Inline text may use **bold** and `code` (both renderers
understand those two and nothing else).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    note: str = ""  # printed under the table: definitions, tests, what "n.s." means


@dataclass
class Image:
    plot: str  # key in the plots dict (file stem)
    alt: str


@dataclass
class Code:
    text: str


Block = Heading | Para | Bullets | Table | Image | Code


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


# ----------------------------------------------------------------------------- number formats
DASH = "—"


def _bad(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x: float | None, digits: int = 1, sign: bool = False) -> str:
    """0.523 -> '52.3%' ('+52.3%' with sign); never '-0.0%'."""
    if _bad(x):
        return DASH
    return f"{round(100 * x, digits) + 0.0:{'+' if sign else ''}.{digits}f}%"  # type: ignore[operator]


def pts(x: float | None, digits: int = 1) -> str:
    """Accuracy difference in percentage points, signed: 0.06 -> '+6.0 pt'."""
    return DASH if _bad(x) else f"{round(100 * x, digits) + 0.0:+.{digits}f} pt"  # type: ignore[operator]


def interval(lo: float | None, hi: float | None, scale: float = 100, digits: int = 1, unit: str = "") -> str:
    if _bad(lo) or _bad(hi):
        return DASH
    if math.isinf(hi):  # type: ignore[arg-type]
        return f"[{scale * lo:.{digits}f}{unit}, ∞)"  # type: ignore[operator]
    return f"[{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]{unit}"  # type: ignore[operator]


def num(x: float | None, digits: int = 3) -> str:
    """Fixed decimals; 4 significant digits from 10^5 up (a random model's perplexity is ~1e10)."""
    if _bad(x):
        return DASH
    return f"{x:.4g}" if abs(x) >= 1e5 else f"{x:.{digits}f}"  # type: ignore[arg-type]


def pval(p: float | None) -> str:
    if _bad(p):
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"  # type: ignore[operator]


def size(b: float | None) -> str:
    """Bytes in binary units: 269_060_096 -> '256.6 MiB'."""
    if _bad(b):
        return DASH
    v = float(b)  # type: ignore[arg-type]
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return DASH  # unreachable


def secs(s: float | None) -> str:
    if _bad(s):
        return DASH
    if s >= 120:  # type: ignore[operator]
        return f"{s / 60:.1f} min"  # type: ignore[operator]
    return f"{1000 * s:.0f} ms" if s < 1 else f"{s:.2f} s"  # type: ignore[operator]


def cell(text: str) -> str:
    """Table cells are one line; a literal '|' would split a Markdown cell."""
    return text.replace("|", "/").replace("\n", " ")
