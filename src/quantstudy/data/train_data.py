"""Training data for the SFT stage: the pool, sample selection, the rows TRL trains on.

Rows come from `conversations.load_conversations` (shared with calibration): OpenMathInstruct-2
problem -> generated_solution, GSM8K question -> answer, ShareGPT `conversations`, or a
local JSONL with prompt/response or messages. Each becomes a `Conversation` that ends with
the assistant reply the model learns (completion-only loss trains that last reply).

`text_hash` is the unit the held-out guard (heldout.py) compares: an evaluated item's question
must never be a training prompt.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from quantstudy.config import TrainConfig
from quantstudy.errors import QuantStudyError
from quantstudy.data.conversations import Conversation, load_conversations

POOL_FACTOR = 20  # hub streams: read samples x 20 rows (at least 10k) to sample from


def text_hash(text: str) -> str:
    """sha256 of text normalized for case and whitespace: the unit the held-out guard compares."""
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


def prompt_hashes(conv: Conversation) -> set[str]:
    """Hash of every user turn and of all user turns joined (an eval question may be either)."""
    users = [c for r, c in conv.messages if r == "user"]
    return {text_hash(u) for u in users} | {text_hash("\n".join(users))}


def trainable(conv: Conversation) -> Conversation | None:
    """The conversation cut after its last assistant reply (the turn that gets the loss); None
    if no user turn is followed by a non-empty reply (e.g. ShareGPT prompt-only files)."""
    msgs = conv.messages
    last = max((i for i, (r, c) in enumerate(msgs) if r == "assistant" and c.strip()), default=None)
    if last is None or not any(r == "user" for r, _ in msgs[:last]):
        return None
    return Conversation(conv.id, msgs[: last + 1])


def load_pool(cfg: TrainConfig, data_dir: Path | None, base_dir: Path) -> list[Conversation]:
    """All trainable rows of the configured source, in file (or stream) order."""
    path = None
    if cfg.path:
        path = Path(cfg.path).expanduser()
        path = path if path.is_absolute() else base_dir / path
    rows = load_conversations(cfg.source.value, data_dir, path, field="train.source",
                              hub_limit=max(POOL_FACTOR * cfg.samples, 10_000))
    pool = [t for c in rows if (t := trainable(c)) is not None]
    if not pool:
        raise QuantStudyError(f"none of the {len(rows)} rows of the training source has a user turn followed by "
                              "an assistant reply", field="train.source", value=cfg.source.value,
                              fix="use rows with prompt/response, problem/generated_solution, question/answer or "
                                  "messages ending in an assistant turn (prompt-only ShareGPT files cannot train)")
    return pool


def select_samples(pool: list[Conversation], n: int, seed: int, exclude: set[str]) -> tuple[list[Conversation], int]:
    """n samples drawn with `seed`, skipping evaluated texts and repeated prompts.

    Returns (samples, number of pool rows held out because they are evaluation items).
    """
    held_out = sum(1 for c in pool if prompt_hashes(c) & exclude)
    seen: set[str] = set()
    usable = []
    for c in pool:
        key = text_hash("\n".join(t for _, t in c.messages[:-1]))
        if not (prompt_hashes(c) & exclude) and key not in seen:  # one reply per prompt: no repeats
            seen.add(key)
            usable.append(c)
    if len(usable) < n:
        raise QuantStudyError(f"the training source has {len(usable)} usable rows ({held_out} held out as "
                              "evaluation items, repeated prompts dropped), fewer than requested",
                              field="train.samples", value=n,
                              fix=f"lower train.samples to at most {len(usable)}, evaluate fewer items of the same "
                                  "data, or use a larger source")
    random.Random(seed).shuffle(usable)
    return usable[:n], held_out


def as_records(samples: list[Conversation], chat: bool, chat_kwargs: dict[str, Any] | None = None
               ) -> list[dict[str, Any]]:
    """TRL prompt/completion rows: conversational (rendered by the chat template) or plain text.
    `chat_kwargs` (model.chat_template_kwargs) ride along in TRL's per-row `chat_template_kwargs`
    column, which SFTTrainer passes to apply_chat_template when it tokenizes the row."""
    if chat:
        extra = {"chat_template_kwargs": dict(chat_kwargs)} if chat_kwargs else {}
        return [{"prompt": c.as_dicts()[:-1], "completion": c.as_dicts()[-1:], **extra} for c in samples]
    # Without a chat template: lm-eval's "Question: ...\nAnswer:" shape, so the trained model
    # answers in the format plain-prompt evaluation uses. TRL appends EOS to the completion.
    out = []
    for c in samples:
        lines = [t + "\n" if r == "system" else f"{'Question' if r == 'user' else 'Answer'}: {t}"
                 for r, t in c.messages[:-1]]
        out.append({"prompt": "\n".join(lines) + "\nAnswer:", "completion": " " + c.messages[-1][1]})
    return out
