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
from quantstudy.config import CalibrationConfig, CalibSource
from quantstudy.errors import QuantStudyError
from quantstudy.data.conversations import Conversation, load_conversations


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
        # config/load.py refuses `train` calibration in a study without a `train:` section
        assert train_pool is not None, "calibration source 'train' needs the study's training samples"
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


def tokenize(cs: CalibrationSet, tokenizer: Any, max_seq_len: int | None) -> Any:
    """-> datasets.Dataset with input_ids/attention_mask, one row per sample (<= max_seq_len tokens; None: whole)."""
    from datasets import Dataset

    # The rendered chat template already carries the special tokens it needs.
    enc = tokenizer(cs.texts, truncation=max_seq_len is not None, max_length=max_seq_len, add_special_tokens=False)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def pack_rows(dataset: Any, max_seq_len: int) -> Any:
    """The calibration tokens end to end, cut into rows of exactly `max_seq_len` (the tail that does not
    fill a row is dropped): what AutoRound calibrates on. Each sample keeps its own special tokens, so a
    row may hold the end of one conversation and the start of the next (as in GPTQ's concatenated
    calibration text).

    Why AutoRound needs rows of one length: llm-compressor 0.14 right-pads rows of different lengths
    and hands auto-round 0.15 the padding as `AutoRound.attention_mask`, an attribute auto-round 0.15
    no longer reads (its loss mask now comes from raw token ids, which llm-compressor's
    `quantize_block` call does not pass). Pad positions then count in every block's loss, and the
    propagated quantized inputs there are not the zeros of the float side: on SmolLM2-135M (16
    ShareGPT rows of 40-128 tokens, 10 steps) block 2's loss started at 1,806 (47 with equal rows)
    and the model's WikiText perplexity was 4,380 (RTN: 31.3). Packed rows have no padding. Remove
    when llm-compressor passes the loss mask auto-round reads."""
    from datasets import Dataset

    flat = [t for ids in dataset["input_ids"] for t in ids]
    rows = [flat[i:i + max_seq_len] for i in range(0, len(flat) - max_seq_len + 1, max_seq_len)]
    if not rows:
        raise QuantStudyError(f"AutoRound calibrates on rows of exactly max_seq_len tokens, and the samples hold "
                              f"only {len(flat)} tokens", field="calibration.max_seq_len", value=max_seq_len,
                              fix=f"use more samples or a max_seq_len of at most {len(flat)}")
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * max_seq_len for _ in rows]})
