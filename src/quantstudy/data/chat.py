"""Chat templates and reasoning blocks: one rule for every place a prompt is rendered or a
response is read.

`render` is the only call of `tokenizer.apply_chat_template` in the project: evaluation,
calibration, SFT data and speed prompts all pass the study's `chat_template_kwargs` through it
(lm-eval 0.4.13's `chat_template_args`, e.g. Qwen3's `enable_thinking`).

`split_reasoning` reads a response the way lm-eval's `postprocess_generated_text` does with a
string `think_end_token`: the answer is the text after the last end marker, left-stripped, and
stop strings apply to that answer only (lm-eval strips the reasoning before applying them, since
a reasoning trace often contains the stop strings). Unlike lm-eval, a response that opened a
reasoning block and never closed it (it ran into the token cap) has an empty answer: the
reasoning is not an answer, and scoring it would credit numbers the model was still weighing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


def render(tokenizer: Any, messages: list[dict[str, str]], kwargs: dict[str, Any] | None,
           add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template with the study's template variables."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **(kwargs or {}))


def merged_kwargs(model_kwargs: dict[str, Any] | None, task_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Model-level template variables, overridden key by key by a task's."""
    return {**(model_kwargs or {}), **(task_kwargs or {})}


def kwargs_tag(kwargs: dict[str, Any] | None) -> str:
    """Stable text of the template variables, for prompt hashes ('' when there are none, so the
    hashes of studies written before chat_template_kwargs existed do not change)."""
    return json.dumps(kwargs, sort_keys=True, ensure_ascii=False) if kwargs else ""


@dataclass(frozen=True)
class Think:
    """Reasoning markers for one generation request."""

    start: str  # e.g. "<think>"
    end: str  # e.g. "</think>"
    open_in_prompt: bool = False  # the prompt itself ends inside a reasoning block (template pre-opened it)

    @classmethod
    def for_prompt(cls, start: str, end: str | None, context: str) -> Think | None:
        if not end:
            return None
        # a template that pre-fills an empty block (Qwen3, enable_thinking=false) closes it in the
        # prompt; one that pre-opens it (some thinking-only templates) leaves the start marker last
        opened = bool(start) and context.rfind(start) > context.rfind(end)
        return cls(start, end, opened)


@dataclass(frozen=True)
class Split:
    reasoning: str | None  # the reasoning block as generated (markers included); None: none in this response
    answer: str  # the text that is scored
    closed: bool  # the block's end marker was generated

    @property
    def unfinished(self) -> bool:
        """Still reasoning when generation ended: with hit_max, the reasoning hit the token cap."""
        return self.reasoning is not None and not self.closed


def split_reasoning(text: str, think: Think | None) -> Split:
    if think is None:
        return Split(None, text, False)
    i = text.rfind(think.end)
    if i >= 0:
        cut = i + len(think.end)
        return Split(text[:cut], text[cut:].lstrip(), True)
    if think.open_in_prompt or (think.start and think.start in text):
        return Split(text, "", False)
    return Split(None, text, False)


def cut_at_stops(text: str, stops: list[str] | tuple[str, ...]) -> str:
    """lm-eval's postprocess_generated_text: the text before the first occurrence of each stop."""
    for term in stops:
        if term:
            text = text.split(term)[0]
    return text


def reasoning_token_count(tokens: list[int], decode: Any, end: str) -> int:
    """Generated tokens up to and including the last end marker (0 if none).

    The marker may span several tokens, so this finds the shortest token prefix whose decoded text
    holds as many markers as the whole response: the count only grows with the prefix, so a
    binary search needs ~log2(n) decodes instead of n.
    """
    total = decode(tokens).count(end)
    if total == 0:
        return 0
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if decode(tokens[:mid]).count(end) >= total:
            hi = mid
        else:
            lo = mid + 1
    return lo


def read_response(text: str, tokens: list[int], decode: Any, think: Think | None) -> tuple[Split, int]:
    """A generated response's reasoning block and the tokens it took: none, all of them (never
    closed), or up to the last end marker. `text` is `tokens` decoded; `decode` decodes a prefix."""
    sp = split_reasoning(text, think)
    if sp.reasoning is None:
        return sp, 0
    if not sp.closed:
        return sp, len(tokens)
    return sp, reasoning_token_count(tokens, decode, think.end)  # type: ignore[union-attr]
