"""What stages return: plain dataclasses, picklable, written to the store by the driver alone.

A stage never touches the store. It yields records; `Store.write(record)` writes each one in
one transaction (study.py is the only caller). So a stage can run in another process or on
another machine, and one stage's output is never half written:
  MadeModel  a model a stage made (resolve, train, quantize) with everything about its making:
             metrics, per-layer errors, calibration samples, curves. Written with the removal of
             every result computed on the model's previous weights, in the same transaction.
  ItemBatch  scored items of one task (evaluate's unit of resume: a killed run loses at most
             the batch in flight), with the metrics that go with them.
  Metrics    scalar results of one model (aggregates, speed, fidelity).
  Note       a line for the console (what the stage wants the user to know).
  Provenance where a stage ran (node, hardware, library versions): kept with the stage's done row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelRecord:
    name: str
    role: str  # "baseline" | "trained" | "quantized"
    path: str
    parent: str | None = None  # the model this one was derived from
    spec: dict[str, Any] = field(default_factory=dict)  # variant settings, source, ...
    size_bytes: int | None = None  # weight files on disk
    weights_hash: str | None = None
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class ItemRecord:
    task: str
    item_id: str
    item_hash: str  # hash of the item's content (question + choices + gold)
    prompt_hash: str  # hash of the exact prompt text sent to the model
    gold: str
    prediction: str
    correct: bool | None  # None for items without right/wrong (perplexity windows)
    score: float | None = None  # continuous per-item metric (F1, NLL, ...)
    details: dict[str, Any] = field(default_factory=dict)  # loglikelihoods, text, ...
    n_tokens: int | None = None  # generated tokens (generative tasks)
    hit_max: bool | None = None  # generation stopped at max_new_tokens
    latency_s: float | None = None


@dataclass
class Metric:
    name: str  # e.g. "eval.arc_easy.acc", "speed.speedup", "quantize.seconds"
    value: float | None
    info: dict[str, Any] = field(default_factory=dict)  # how it was measured


@dataclass
class Metrics:
    model: str
    metrics: list[Metric]


@dataclass
class ItemBatch:
    model: str
    rows: list[ItemRecord]
    metrics: list[Metric] = field(default_factory=list)
    progress: tuple[str, int, int] | None = None  # (label, items done, items in the task) for the console


@dataclass
class MadeModel:
    model: ModelRecord
    metrics: list[Metric] = field(default_factory=list)
    layers: list[tuple[str, float | None, float | None]] | None = None  # (layer, error, seconds)
    calibration: list[tuple[str, str]] | None = None  # (sample id, sample hash), in order
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # e.g. {"loss": [(step, value)]}


@dataclass
class Note:
    text: str  # rich markup allowed


@dataclass
class Provenance:
    node: str
    hardware: dict[str, Any]
    versions: dict[str, str]


Record = MadeModel | ItemBatch | Metrics | Note | Provenance
