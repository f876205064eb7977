"""The held-out guard: what a study trains and calibrates on is never what it evaluates.

Plain functions of the study config and the data folder, so the plan can check them before
any stage runs and the train and quantize stages get the same answer from the same code:
  - `evaluated_hashes`: the text hash of every evaluated item's question (`train_data.text_hash`);
  - `plan_samples`: the exact SFT samples (also the `train` calibration source). Built-in pools
    (OpenMathInstruct-2, GSM8K, ShareGPT) are sampled around the evaluated items; data the user
    names (source `jsonl`) is used as given, so an overlap there is an error that names the items;
  - `check_held_out`: a calibration source that is also evaluation text is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from quantstudy.config import CalibrationConfig, CalibSource, StudyConfig, TaskName, TrainSource
from quantstudy.data import train_data
from quantstudy.data.conversations import Conversation
from quantstudy.errors import QuantStudyError


def evaluated_hashes(cfg: StudyConfig, data_dir: Path | None) -> dict[str, str]:
    """text hash of each evaluated item's question -> "<task>/<item id>"."""
    from quantstudy.tasks.selection import select_items  # reads the task data: only when a guard needs it

    if cfg.evaluate is None:
        return {}
    return {train_data.text_hash(item.question): f"{spec.name.value}/{item.id}"
            for spec in cfg.evaluate.task_specs() for item in select_items(spec, cfg.evaluate, data_dir)
            if item.question.strip()}


def train_hashes(samples: Iterable[Conversation]) -> dict[str, str]:
    """text hash -> sample id over every prompt hash of every sample."""
    return {h: c.id for c in samples for h in train_data.prompt_hashes(c)}


def guard_overlap(train: dict[str, str], evaluated: dict[str, str]) -> None:
    """Raise if a training text hash is an evaluated item's hash.

    train: text hash -> training sample id; evaluated: text hash -> "<task>/<item id>".
    """
    both = sorted(set(train) & set(evaluated), key=lambda h: evaluated[h])
    if both:
        names = [f"{evaluated[h]} (training sample {train[h]})" for h in both]
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise QuantStudyError(f"{len(both)} training samples are evaluation items: {shown}",
                              field="train", value=len(both),
                              fix="remove these rows from the training file, or evaluate other items")


def plan_samples(cfg: StudyConfig, data_dir: Path | None, config_dir: Path) -> tuple[list[Conversation], int]:
    """The exact training samples of this study and how many pool rows were held out as evaluation
    items; relative paths start at `config_dir` (the study file's folder). Raises if a training
    text is evaluated."""
    assert cfg.train is not None, "the plan has a train stage (or `train` calibration) only with a `train:` section"
    pool = train_data.load_pool(cfg.train, data_dir, config_dir)
    evaluated = evaluated_hashes(cfg, data_dir)
    # Built-in pools are sampled around the evaluated items; a user's own file is used as is.
    exclude = set() if cfg.train.source == TrainSource.jsonl else set(evaluated)
    samples, held_out = train_data.select_samples(pool, cfg.train.samples, cfg.train.seed, exclude)
    guard_overlap(train_hashes(samples), evaluated)
    return samples, held_out


def check_held_out(cfg: StudyConfig, calibs: list[tuple[str, CalibrationConfig]], offline: bool) -> None:
    """Calibration must not see the text a study evaluates on. Offline, `wikitext` calibration
    reads wiki.test.raw (the data dir holds only the test split), the same text the wikitext
    task and the fidelity stage score; `openmathinstruct2` calibration and evaluation both draw
    from the same rows, online and offline. (gsm8k calibrates on train, evaluates on test.)"""
    tasks = {s.name for s in cfg.evaluate.task_specs()} if cfg.evaluate else set()
    for where, c in calibs:
        uses: list[str] = []
        if c.source == CalibSource.wikitext and offline:
            uses += ["evaluate task wikitext"] if TaskName.wikitext in tasks else []
            uses += ["fidelity.source wikitext"] if cfg.fidelity and cfg.fidelity.source == "wikitext" else []
        if c.source == CalibSource.openmathinstruct2 and TaskName.openmathinstruct2 in tasks:
            uses.append("evaluate task openmathinstruct2")
        if uses:
            raise QuantStudyError(f"the calibration text is also evaluation text ({', '.join(uses)}): a variant "
                                  "calibrated on it would be scored on what it was fitted to",
                                  field=where, value=c.source.value,
                                  fix="calibrate on another source (sharegpt, gsm8k, jsonl, train) or drop that "
                                      "task / fidelity text" + (", or use the hub's wikitext train split (no data_dir)"
                                                                if c.source == CalibSource.wikitext else ""))
