"""The reference scorer: lm-evaluation-harness's own HFLM behind the `Scorer` Protocol.

Every number comes from lm-eval 0.4.13 code (tokenization, batching, rolling windows, stop
handling); this wrapper only adapts the call shapes. HFLM's generate_until returns text only,
so a small subclass records what generation needs per request: the generated token ids
(`_model_generate` output, read back in the same row order in which HFLM reports each row to
its cache hook), which gives the token count and whether max_new_tokens was hit.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from quantstudy.data.chat import cut_at_stops, read_response
from quantstudy.scoring.protocol import GenRequest, GenResult, LLRequest, LLResult, RollingResult


class _RecordingHFLM(HFLM):
    """HFLM that keeps each generated row's continuation tokens and the batch wall time."""

    def _model_generate(self, context: Any, max_length: int, stop: list[str], **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = super()._model_generate(context, max_length, stop, **kw)
        per_row = (time.perf_counter() - t0) / out.shape[0]
        for row in out[:, context.shape[1]:].tolist():
            self._rows.append((row, max_length - context.shape[1], per_row))
        return out


class _Hook:
    """Stands in for lm-eval's cache hook: pairs each reported (context, kwargs) with its row."""

    def __init__(self, lm: _RecordingHFLM):
        self.lm, self.by_context = lm, {}

    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        if attr == "generate_until":
            self.by_context[req[0]] = (res, *self.lm._rows.popleft())


class LMEvalScorer:
    name = "lmeval-hf"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, device: str = "cpu"):
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # "pretrained is not a str" warning
        self.lm = _RecordingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        self.lm._rows = deque()
        self.tok, self.batch_size = tokenizer, batch_size

    def loglikelihood(self, requests: list[LLRequest]) -> list[LLResult]:
        inst = [Instance("loglikelihood", {}, (r.context, r.continuation), i) for i, r in enumerate(requests)]
        out = self.lm.loglikelihood(inst, disable_tqdm=True)
        return [LLResult(float(lp), bool(g), self._n_cont(r)) for (lp, g), r in zip(out, requests)]

    def _n_cont(self, r: LLRequest) -> int:
        if r.context == "":
            return len(self.lm.tok_encode(r.continuation, add_special_tokens=False))
        return len(self.lm._encode_pair(r.context, r.continuation)[1])

    def loglikelihood_rolling(self, texts: list[str]) -> list[RollingResult]:
        # one document at a time: a batch of 16 full-length windows would need 16 x max_length x
        # vocab logits (tens of GB for an 8k-context model); windows of one document still batch
        old, self.lm.batch_size_per_gpu = self.lm.batch_size_per_gpu, 1
        try:
            out = []
            for i, t in enumerate(texts):
                lp = self.lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)], disable_tqdm=True)
                out.append(RollingResult(float(lp[0]), len(self.lm.tok_encode(t))))
            return out
        finally:
            self.lm.batch_size_per_gpu = old

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        ends = {r.think.end if r.think else None for r in requests}
        if len(ends) > 1:
            raise ValueError(f"one generate call with different reasoning end markers: {ends}")
        # HFLM's own think_end_token: it strips the reasoning before applying stop strings
        self.lm.think_end_token = ends.pop() if ends else None
        hook = _Hook(self.lm)
        self.lm.cache_hook, self.lm._rows = hook, deque()
        inst = [Instance("generate_until", {}, (r.context, {"until": list(r.until), "max_gen_toks": r.max_new_tokens,
                                                              "do_sample": False}), i)
                for i, r in enumerate(requests)]
        self.lm.generate_until(inst, disable_tqdm=True)
        stop_ids = {self.tok.eos_token_id, self.tok.pad_token_id} - {None}
        out = []
        for r in requests:
            text, row, budget, latency = hook.by_context[r.context]
            n = next((k for k, t in enumerate(row) if t in stop_ids), len(row))  # tokens before EOS/padding
            raw = self.tok.decode(row[:n], skip_special_tokens=True)
            stopped = any(s and s in raw for s in r.until) or n < len(row)
            # count the tokens kept: the text up to the stop string, re-encoded
            kept = len(self.tok.encode(text, add_special_tokens=False)) if text != raw else n
            sp, n_think = read_response(raw, row[:n], lambda t: self.tok.decode(t, skip_special_tokens=True), r.think)
            if sp.reasoning is not None:  # lm-eval's text lost the reasoning: count the tokens kept from raw
                after = raw[len(sp.reasoning):]
                cut = cut_at_stops(after, r.until)
                kept = n if sp.unfinished or cut == after else n_think + len(self.tok.encode(cut, add_special_tokens=False))
            out.append(GenResult("" if sp.unfinished else text, kept, not stopped and n >= budget, latency,
                                 sp.reasoning, n_think, sp.closed))
        return out
