"""The driver's context: config, study directory, store, device, console. Stages never see it: they get
a `Job` (stages/protocol.py), plain data built from it by `RunContext.job`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from quantstudy.config import StudyConfig
from quantstudy.stages.protocol import Job, StageName, data_id
from quantstudy.store import Store


@dataclass
class RunContext:
    cfg: StudyConfig
    study_dir: Path  # everything the study writes lives below this folder
    config_dir: Path  # folder of the study file: relative paths in the config start here
    store: Store
    data_dir: Path | None  # offline raw data (layout of ../shared/data); None = Hugging Face hub
    device: str  # "cpu" or "cuda", resolved from cfg.device
    console: Console
    debug: bool = False
    output: Any = None  # logs.Output: where library output goes per stage (None: not captured)
    ray_address: str | None = None  # run stages as Ray tasks on this cluster (None: in this process)

    @property
    def data_id(self) -> str:
        return data_id(self.data_dir)

    def job(self, stage: StageName, name: str, **kw: Any) -> Job:
        """A stage's job on model `name`, carrying this run's paths and settings (kw: the Job's other fields)."""
        return Job(stage, name, self.cfg, self.study_dir, self.config_dir, self.data_dir, self.device,
                   debug=self.debug, **kw)
