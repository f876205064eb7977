"""Study report: report.md (+ PNG plots beside it), a self-contained report.html, results.json.

`write_report` only reads the store: re-rendering recomputes no model output, and the
statistics (fixed bootstrap seed) come out the same every time. Files are written to a
temporary name and renamed into place, so a reader never sees half a report.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from quantstudy.errors import QuantStudyError
from quantstudy.report import html, markdown, plots, recommend
from quantstudy.report import sections_compare as compare
from quantstudy.report import sections_summary as summary
from quantstudy.report import sections_tasks as tasks
from quantstudy.report.analysis import Analysis, analyze
from quantstudy.report.document import Document
from quantstudy.report.jsonout import results
from quantstudy.report.recommend import RankRow, Recommendation
from quantstudy.store import Store
from quantstudy.runtime.faults import failpoint

FORMATS = ("md", "html", "json")


def build(a: Analysis, title: str, recs: list[Recommendation], rank: list[RankRow]) -> Document:
    doc = Document(title)
    summary.summary(doc, a, recs)
    summary.models_table(doc, a)
    tasks.per_task(doc, a)
    tasks.flips(doc, a)
    tasks.subsets(doc, a)
    tasks.health(doc, a)
    tasks.mmlu(doc, a)
    compare.pairs(doc, a)
    compare.training(doc, a)
    compare.fidelity(doc, a)
    summary.decision(doc, a)
    summary.ranking(doc, a, rank)
    summary.recommendations(doc, a, recs)
    compare.technical(doc, a)
    return doc


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        failpoint("report-write")  # tests kill here: a temp file exists, the report does not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(store: Store, study_dir: Path, formats: set[str] = frozenset(FORMATS)) -> list[Path]:  # type: ignore[assignment]
    """Write the requested formats into study_dir; returns the paths written (plots included)."""
    bad = sorted(set(formats) - set(FORMATS))
    if bad or not formats:
        raise QuantStudyError("unknown report format", field="--format", value=",".join(bad) or "(none)",
                              fix=f"use a comma-separated subset of {','.join(FORMATS)}")
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    a = analyze(store)
    cfg = a.meta.get("config")
    name = cfg.get("name") if isinstance(cfg, dict) else None
    recs, rank = recommend.recommendations(a), recommend.ranking(a)
    doc = build(a, f"Quantization study report: {name or study_dir.name}", recs, rank)
    pngs = plots.render_all(a) if {"md", "html"} & set(formats) else {}
    written = []
    if "md" in formats:
        for key, png in pngs.items():
            written.append(study_dir / markdown.plot_file(key))
            _atomic_write(written[-1], png)
        written.append(study_dir / "report.md")
        _atomic_write(written[-1], markdown.render(doc, set(pngs)).encode())
    if "html" in formats:
        written.append(study_dir / "report.html")
        _atomic_write(written[-1], html.render(doc, pngs).encode())
    if "json" in formats:
        written.append(study_dir / "results.json")
        _atomic_write(written[-1], json.dumps(results(a, recs, rank), indent=1, allow_nan=False).encode())
    return written
