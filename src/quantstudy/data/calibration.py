"""Calibration sets: sample N conversations reproducibly, render them, tokenize them.

Sampling is a seeded permutation of the whole source, cut at N. So with the same seed,
the 215-sample set is exactly the first 215 of the 512-sample set: two variants that
differ only in sample count share their first N samples, and the store records the ids
and hashes to prove it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantstudy.data import chat
from quantstudy.config import CalibrationConfig, CalibSource, StudyConfig, TaskName
from quantstudy.errors import QuantStudyError
from quantstudy.data.sources import Conversation, load_conversations


@dataclass(frozen=True)
class CalibrationSet:
    ids: list[str]  # sample ids in the order used
    hashes: list[str]  # sha256 of each rendered text (what the model saw, before truncation)
    texts: list[str]

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256("".join(self.hashes).encode()).hexdigest()


def resolve_path(calib: CalibrationConfig, base: Path) -> Path | None:
    if calib.path is None:
        return None
    p = Path(calib.path).expanduser()
    return p if p.is_absolute() else base / p


def sample_conversations(pool: list[Conversation], n: int, seed: int, where: str) -> list[Conversation]:
    if n > len(pool):
        raise QuantStudyError(f"asks for {n} calibration samples but the source has only {len(pool)}",
                              field=where, value=n, fix=f"use at most {len(pool)} samples or a larger source")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)  # seeded permutation; prefixes are shared across N
    return [pool[i] for i in order[:n]]


def render(conv: Conversation, tokenizer: Any, chat_template: bool, chat_kwargs: dict[str, Any] | None = None) -> str:
    """Text the model is calibrated on: the model's own chat template (with the study's template
    variables, e.g. enable_thinking), or plain turns."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        add_gen = conv.messages[-1][0] != "assistant"
        return chat.render(tokenizer, conv.as_dicts(), chat_kwargs, add_generation_prompt=add_gen)
    return "\n\n".join(c for _, c in conv.messages)


def build_calibration(calib: CalibrationConfig, tokenizer: Any, data_dir: Path | None, base: Path,
                      train_pool: list[Conversation] | None = None,
                      chat_kwargs: dict[str, Any] | None = None) -> CalibrationSet:
    """Pick `calib.samples` samples from the configured source and render them."""
    n = int(calib.samples)  # type: ignore[arg-type]  # lists are expanded before this point
    if calib.source == CalibSource.train:
        if train_pool is None:
            raise QuantStudyError("calibration source 'train' needs a `train:` section in the study",
                                  field="calibration.source", value="train",
                                  fix="add `train:` or choose sharegpt/openmathinstruct2/gsm8k/wikitext/jsonl")
        pool = train_pool
    else:
        pool = load_conversations(calib.source.value, data_dir, resolve_path(calib, base))
    chosen = sample_conversations(pool, n, calib.seed, "calibration.samples")
    texts = [render(c, tokenizer, calib.chat_template, chat_kwargs) for c in chosen]
    empty = [c.id for c, t in zip(chosen, texts) if not t.strip()]
    if empty:
        raise QuantStudyError("calibration samples with no text", field="calibration.source", value=empty[:5],
                              fix="clean the source file or choose another source")
    return CalibrationSet(ids=[c.id for c in chosen],
                          hashes=[hashlib.sha256(t.encode()).hexdigest() for t in texts], texts=texts)


def tokenize(cs: CalibrationSet, tokenizer: Any, max_seq_len: int) -> Any:
    """-> datasets.Dataset with input_ids/attention_mask, one row per sample (<= max_seq_len tokens)."""
    from datasets import Dataset

    # The rendered chat template already carries the special tokens it needs.
    enc = tokenizer(cs.texts, truncation=True, max_length=max_seq_len, add_special_tokens=False)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


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
