"""SQLite results store: the single record of what a study has done.

One file per study (`<study_dir>/store.sqlite`). Every write is one transaction, so a
killed process leaves either the old or the new state, never half a row set. A stage
is recorded `done` only after its artifact was renamed into place (see study.py). Stages
never write here: they return records (records.py) and the driver calls `write` for each.

Tables
  meta(key, value)                        schema version, versions, hardware
  stages(key, stage, model, status, ...)  cache entries: key = hash of all inputs
  models(name, role, parent, path, ...)   baseline / trained / quantized models
  metrics(model, name, value, info)       scalar results; info (JSON) says how measured
  items(model, task, item_id, ...)        one row per evaluated item per model
  layers(model, layer, error, seconds)    llm-compressor's per-layer report
  calibration(model, idx, sample_id, sample_hash)  exact calibration samples used
  series(model, name, step, value)        curves (training loss, ...)
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from quantstudy.errors import QuantStudyError
from quantstudy.records import (ItemBatch, ItemRecord, MadeModel, Metric, Metrics, ModelRecord, Note, Provenance,
                                Record)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS stages(
  key TEXT PRIMARY KEY, stage TEXT, model TEXT, status TEXT, artifact TEXT,
  started REAL, finished REAL, info TEXT);
CREATE TABLE IF NOT EXISTS models(
  name TEXT PRIMARY KEY, role TEXT, parent TEXT, path TEXT, spec TEXT,
  size_bytes INTEGER, weights_hash TEXT, versions TEXT, created REAL);
CREATE TABLE IF NOT EXISTS metrics(
  model TEXT, name TEXT, value REAL, info TEXT, PRIMARY KEY(model, name));
CREATE TABLE IF NOT EXISTS items(
  model TEXT, task TEXT, item_id TEXT, item_hash TEXT, prompt_hash TEXT,
  gold TEXT, prediction TEXT, correct INTEGER, score REAL, details TEXT,
  n_tokens INTEGER, hit_max INTEGER, latency_s REAL,
  PRIMARY KEY(model, task, item_id));
CREATE TABLE IF NOT EXISTS layers(
  model TEXT, layer TEXT, error REAL, seconds REAL, PRIMARY KEY(model, layer));
CREATE TABLE IF NOT EXISTS calibration(
  model TEXT, idx INTEGER, sample_id TEXT, sample_hash TEXT, PRIMARY KEY(model, idx));
CREATE TABLE IF NOT EXISTS series(
  model TEXT, name TEXT, step REAL, value REAL, PRIMARY KEY(model, name, step));
"""


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not self.path.is_file():
            raise QuantStudyError(f"study store {self.path} is not a file", fix="move it away: the study "
                                  "keeps its record in this path")
        # timeout: a second process waits for the write lock instead of failing at once
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            # reads every page: a damaged store fails here, before any stage runs, not mid-run
            check = self.db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            self.db.executescript(_SCHEMA)
            found = self.get_meta("schema_version")
        except sqlite3.DatabaseError as e:  # not SQLite, truncated, or a corrupt page; never overwritten
            self.db.close()
            raise QuantStudyError(
                f"study store {self.path} is not a readable SQLite database ({e})",
                fix="restore it from a backup, or move it away to start the study afresh (models under "
                    "models/ are reused only after their stages run again)") from None
        if found is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(found) != SCHEMA_VERSION:
            raise QuantStudyError(
                f"study store {self.path} was written by an incompatible quantstudy (schema {found}, "
                f"this version reads {SCHEMA_VERSION})",
                fix="use a new output_dir, or delete the old study directory to recompute")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tx(self) -> sqlite3.Connection:
        """`with store.tx():` one atomic transaction (BEGIN IMMEDIATE takes the write lock)."""
        return _Tx(self.db)  # type: ignore[return-value]

    # ---------------------------------------------------------------- meta
    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES(?,?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    # ---------------------------------------------------------------- stages (cache)
    def stage_done(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT artifact, info FROM stages WHERE key=? AND status='done'", (key,)).fetchone()
        if row is None:
            return None
        return {"artifact": row[0], **json.loads(row[1] or "{}")}

    def stage_start(self, key: str, stage: str, model: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO stages(key, stage, model, status, started) VALUES(?,?,?,'running',?)",
            (key, stage, model, time.time()))

    def stage_finish(self, key: str, artifact: str | None = None, info: dict[str, Any] | None = None) -> None:
        self.db.execute("UPDATE stages SET status='done', artifact=?, finished=?, info=? WHERE key=?",
                        (artifact, time.time(), json.dumps(info or {}), key))

    def rekey_stage(self, old: str, new: str) -> None:
        """A done stage keeps its results under a new key (a key formula changed, inputs did not)."""
        self.db.execute("UPDATE stages SET key=? WHERE key=?", (new, old))

    def stages(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT key, stage, model, status, artifact, started, finished, info FROM stages")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    # ---------------------------------------------------------------- models
    def put_model(self, m: ModelRecord) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO models VALUES(?,?,?,?,?,?,?,?,?)",
            (m.name, m.role, m.parent, m.path, json.dumps(m.spec), m.size_bytes, m.weights_hash,
             json.dumps(m.versions), time.time()))

    def models(self) -> list[ModelRecord]:
        rows = self.db.execute(
            "SELECT name, role, path, parent, spec, size_bytes, weights_hash, versions FROM models ORDER BY created")
        return [ModelRecord(n, r, p, par, json.loads(s), sz, h, json.loads(v)) for n, r, p, par, s, sz, h, v in rows]

    def model(self, name: str) -> ModelRecord | None:
        return next((m for m in self.models() if m.name == name), None)

    # ---------------------------------------------------------------- metrics
    def put_metric(self, model: str, name: str, value: float | None, info: dict[str, Any] | None = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO metrics VALUES(?,?,?,?)", (model, name, value, json.dumps(info or {})))

    def metrics(self, model: str | None = None) -> list[tuple[str, str, float | None, dict[str, Any]]]:
        q, a = "SELECT model, name, value, info FROM metrics", ()
        if model is not None:
            q, a = q + " WHERE model=?", (model,)
        return [(m, n, v, json.loads(i)) for m, n, v, i in self.db.execute(q, a)]

    # ---------------------------------------------------------------- items
    def put_items(self, model: str, rows: Iterable[ItemRecord]) -> None:
        with self.tx():
            self._put_items(model, rows)

    def items(self, model: str | None = None, task: str | None = None) -> Iterator[tuple[str, ItemRecord]]:
        q, conds, args = "SELECT * FROM items", [], []
        for col, val in (("model", model), ("task", task)):
            if val is not None:
                conds.append(f"{col}=?")
                args.append(val)
        if conds:
            q += " WHERE " + " AND ".join(conds)
        for r in self.db.execute(q + " ORDER BY rowid", args):
            yield r[0], ItemRecord(task=r[1], item_id=r[2], item_hash=r[3], prompt_hash=r[4], gold=r[5],
                                   prediction=r[6], correct=None if r[7] is None else bool(r[7]), score=r[8],
                                   details=json.loads(r[9] or "{}"), n_tokens=r[10],
                                   hit_max=None if r[11] is None else bool(r[11]), latency_s=r[12])

    # ---------------------------------------------------------------- per-layer, calibration, series
    def layers(self, model: str) -> list[tuple[str, float | None, float | None]]:
        return list(self.db.execute("SELECT layer, error, seconds FROM layers WHERE model=? ORDER BY rowid", (model,)))

    def calibration(self, model: str) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT sample_id, sample_hash FROM calibration WHERE model=? ORDER BY idx",
                                    (model,)))

    def put_series(self, model: str, name: str, points: Iterable[tuple[float, float]]) -> None:
        """A whole series (e.g. a loss curve): replaces the model's previous series of that name."""
        with self.tx():
            self.db.execute("DELETE FROM series WHERE model=? AND name=?", (model, name))
            self.db.executemany("INSERT OR REPLACE INTO series VALUES(?,?,?,?)",
                                [(model, name, s, v) for s, v in points])

    def series(self, model: str, name: str) -> list[tuple[float, float]]:
        return list(self.db.execute("SELECT step, value FROM series WHERE model=? AND name=? ORDER BY step",
                                    (model, name)))


    # ---------------------------------------------------------------- the one writer
    def write(self, rec: Record, stage_key: str | None = None) -> None:
        """Write one record of a stage, in one transaction (the driver's only way in)."""
        if isinstance(rec, (Note, Provenance)):
            return  # printed by the driver / kept with the stage's done row
        with self.tx():
            if isinstance(rec, MadeModel):
                self._made(rec, stage_key)
            elif isinstance(rec, ItemBatch):
                self._put_items(rec.model, rec.rows)
                self._put_metrics(rec.model, rec.metrics)
            elif isinstance(rec, Metrics):
                self._put_metrics(rec.model, rec.metrics)
            else:
                raise TypeError(f"not a stage record: {type(rec).__name__}")

    def _made(self, rec: MadeModel, stage_key: str | None) -> None:
        """A model made anew: everything computed on its previous weights goes, then the model and
        what its making recorded. Same weights (a re-make that changed nothing): results stay."""
        m, old = rec.model, self.model(rec.model.name)
        if stage_key is not None:
            m.spec = {**m.spec, "stage_key": stage_key}
        if old is None or old.weights_hash != m.weights_hash:
            self._forget(m.name, keep_stage=stage_key)
        self.db.execute(
            "INSERT OR REPLACE INTO models VALUES(?,?,?,?,?,?,?,?,?)",
            (m.name, m.role, m.parent, m.path, json.dumps(m.spec), m.size_bytes, m.weights_hash,
             json.dumps(m.versions), time.time()))
        self._put_metrics(m.name, rec.metrics)
        if rec.layers is not None:
            self.db.execute("DELETE FROM layers WHERE model=?", (m.name,))
            self.db.executemany("INSERT OR REPLACE INTO layers VALUES(?,?,?,?)", [(m.name, *r) for r in rec.layers])
        if rec.calibration is not None:
            self.db.execute("DELETE FROM calibration WHERE model=?", (m.name,))
            self.db.executemany("INSERT INTO calibration VALUES(?,?,?,?)",
                                [(m.name, i, sid, h) for i, (sid, h) in enumerate(rec.calibration)])
        for name, points in rec.series.items():
            self.db.execute("DELETE FROM series WHERE model=? AND name=?", (m.name, name))
            self.db.executemany("INSERT OR REPLACE INTO series VALUES(?,?,?,?)",
                                [(m.name, name, s, v) for s, v in points])

    def _forget(self, model: str, keep_stage: str | None) -> None:
        """Everything recorded about a model, except the stage now making it (a plain delete)."""
        for table in ("items", "metrics", "series", "layers", "calibration"):
            self.db.execute(f"DELETE FROM {table} WHERE model=?", (model,))
        self.db.execute("DELETE FROM stages WHERE model=? AND key IS NOT ?", (model, keep_stage))

    def _put_metrics(self, model: str, metrics: list[Metric]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO metrics VALUES(?,?,?,?)",
                            [(model, m.name, m.value, json.dumps(m.info or {})) for m in metrics])

    def _put_items(self, model: str, rows: Iterable[ItemRecord]) -> None:
        data = [(model, r.task, r.item_id, r.item_hash, r.prompt_hash, r.gold, r.prediction,
                 None if r.correct is None else int(r.correct), r.score, json.dumps(r.details), r.n_tokens,
                 None if r.hit_max is None else int(r.hit_max), r.latency_s) for r in rows]
        self.db.executemany("INSERT OR REPLACE INTO items VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)", data)


class _Tx:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")

