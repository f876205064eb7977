"""The scoring interface every evaluation backend implements.

Semantics follow lm-evaluation-harness's LM API exactly, so a task written against it
means the same thing whichever backend runs it:
  loglikelihood(ctx, cont)  -> sum of log p(cont tokens | ctx), and whether every
                               continuation token was the argmax (lm-eval's is_greedy)
  loglikelihood_rolling(t)  -> total log p of a text, scored in rolling windows
  generate(ctx, until, n)   -> greedy text, cut at the first stop string
Token splitting follows lm-eval's HFLM._encode_pair (trailing context spaces move to
the continuation; continuation tokens = encode(ctx+cont)[len(encode(ctx)):]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from quantstudy.data.chat import Think


@dataclass(frozen=True)
class LLRequest:
    context: str
    continuation: str


@dataclass(frozen=True)
class LLResult:
    logprob: float  # nats, summed over continuation tokens
    is_greedy: bool
    n_tokens: int  # continuation length in tokens


@dataclass(frozen=True)
class GenRequest:
    context: str
    until: tuple[str, ...]  # stop strings; generation is cut before the first one
    max_new_tokens: int
    think: Think | None = None  # reasoning markers: stops apply after the block, the answer is what follows it


@dataclass(frozen=True)
class GenResult:
    text: str
    n_tokens: int  # tokens generated (before cutting at a stop string)
    hit_max: bool  # stopped because max_new_tokens was reached
    latency_s: float  # wall time attributed to this request (batch time / batch size)
    reasoning: str | None = None  # the reasoning block (GenRequest.think), None when the response has none
    reasoning_tokens: int = 0  # generated tokens up to and including the end marker (all of them if unclosed)
    reasoning_closed: bool = False  # the end marker was generated


@dataclass(frozen=True)
class RollingResult:
    logprob: float  # nats over all tokens of the text
    n_tokens: int


class Scorer(Protocol):
    name: str  # e.g. "lmeval-hf", "prefix-shared"; recorded with every result

    def loglikelihood(self, requests: list[LLRequest]) -> list[LLResult]: ...

    def loglikelihood_rolling(self, texts: list[str]) -> list[RollingResult]: ...

    def generate(self, requests: list[GenRequest]) -> list[GenResult]: ...
