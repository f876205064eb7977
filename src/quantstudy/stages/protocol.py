"""The Stage protocol: a name, what its cache key depends on, and `run(job) -> records`.

A stage is a small object (see the `Stage` class at the end of each stage module) that
  - declares its key's inputs: the parts of the study config that change its output, next to
    the code that reads them (evaluate's key does not hash the speed settings, fidelity's does
    not hash evaluation settings), and
  - runs a `Job`: plain, picklable data (paths, the study config, the models it works on, the
    items already stored for resume), yielding records (records.py) that the driver writes.
A stage never opens the store and never prints: what it has to say is a `Note` record; its
progress goes to `job.progress`, the one field that is not data (a rich progress view in
process, a no-op by default).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Protocol

from quantstudy.config import StudyConfig
from quantstudy.records import ItemRecord, ModelRecord, Record


def key_of(*parts: object) -> str:
    """A stage's cache key: a hash of everything that can change its output."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class StageName(str, Enum):
    resolve = "resolve"
    train = "train"
    quantize = "quantize"
    evaluate = "evaluate"
    measure = "measure"
    fidelity = "fidelity"


class QuietProgress:
    """The progress view of a job nobody watches (a test, a worker without a console)."""

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        return 0

    def advance(self, tid: int, advance: float = 1) -> None:
        pass

    def update(self, tid: int, **kw: Any) -> None:
        pass


@dataclass
class Job:
    """One stage's work on one model."""

    stage: StageName
    name: str  # the model this stage makes (resolve, train, quantize) or works on
    cfg: StudyConfig
    study_dir: Path  # everything the study writes lives below this folder
    config_dir: Path  # folder of the study file: relative paths in the config start here
    data_dir: Path | None  # offline raw data (layout of ../shared/data); None = Hugging Face hub
    device: str  # "cpu" or "cuda"
    model: ModelRecord | None = None  # evaluate/measure/fidelity: the model; train/quantize: the one it is made from
    parent: ModelRecord | None = None  # measure/fidelity: the model it is compared with
    variant: Any = None  # quantize: the config.variants.Variant to make
    out_dir: Path | None = None  # resolve/train/quantize: where the made model goes
    stored: dict[str, dict[str, ItemRecord]] = field(default_factory=dict)  # evaluate: task key -> item id -> stored
    tasks: list[str] | None = None  # evaluate: only these task entries (keys); None = all of them
    # evaluate: part i of n of each task's prompt-sorted items, scored but not aggregated (a cluster
    # splits a big task over workers; the driver aggregates once every part is stored); None = all
    shard: tuple[int, int] | None = None
    debug: bool = False
    progress: Any = field(default_factory=QuietProgress)  # add_task/advance/update (runtime.progress.make_progress)

    @property
    def data_id(self) -> str:
        return data_id(self.data_dir)

    @property
    def work_dir(self) -> Path:
        return work_dir(self.study_dir)


def data_id(data_dir: Path | None) -> str:
    """What the evaluation data came from, for cache keys and the report."""
    return str(data_dir.resolve()) if data_dir else "huggingface-hub"


def work_dir(study_dir: Path) -> Path:
    """Scratch and cache space inside the study directory (fidelity's parent pass, SFT checkpoints)."""
    p = study_dir / "cache"
    p.mkdir(parents=True, exist_ok=True)
    return p


class Stage(Protocol):
    name: StageName

    def key_inputs(self, cfg: StudyConfig) -> tuple[object, ...]:
        """The config this stage's output depends on (joins the key with the model and data identities)."""
        ...

    def run(self, job: Job) -> Iterator[Record]:
        ...
