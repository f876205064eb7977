"""Token-level comparison of two next-token distributions: rolling windows over a text, each
window's log-probabilities in vocabulary-bounded chunks, and the KL divergence over the baseline's
top-k tokens plus one tail bucket (the fidelity stage, stages/fidelity.py, runs these).

KL approximation (a lower bound). With S = the baseline's top-k tokens and T = the rest,
  KL_k = sum_{i in S} p_i log(p_i/q_i) + p_T log(p_T/q_T),  p_T = 1 - sum_S p, q_T = 1 - sum_S q
is the exact KL between the two distributions coarsened to k+1 outcomes (the tail merged
into one bucket). By the log-sum inequality, sum_{i in T} p_i log(p_i/q_i) >= p_T log(p_T/q_T),
so KL_k <= KL_full (data-processing inequality), with equality when k = vocab size or when
q is proportional to p on the tail. Measured gap (benchmarks/fidelity_topk.py, SmolLM2-135M,
WikiText-2, 8191 tokens, 512-token windows; share by which the mean KL reads low / p99 low):
  k=16: 29-40% / 10-25%   k=64: 17-24% / 6-15%   k=256 (default): 9-13% / 4-7%
  k=1024: 5% / 2-3.5%     k=4096: 1.4% / 0.7-1.2%        (vocab 49152; RTN W4/W8, GPTQ W4)
The relative gap is similar across variants, so rankings hold; absolute KL reads low.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# floats per vocabulary-sized buffer: 2**24 = 64 MB, 110 positions at Qwen3's 151,936 tokens, 341 at
# SmolLM2's 49,152. A whole 512-token window is 311 MB per buffer at 151,936, and the KL arithmetic
# holds ~4 such buffers at once (logits, log-softmax, the top-k tail's masked copy, its logsumexp).
# Peak RSS growth of one fidelity run at vocab 151,936 (tests/test_qwen3.py): whole windows 1220 MiB,
# 64 MB chunks 283 MiB, but 16 MB chunks 1432 MiB: glibc serves blocks under its 32 MB mmap ceiling
# from the heap, where freed chunks of varying size fragment it; larger blocks go back to the OS.
HEAD_FLOATS = 1 << 24


def windows(n: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first, stop) per window: input ids[begin:stop-1] scores targets ids[first:stop].

    As lm-eval's rolling windows: every token 1..n-1 is scored exactly once, `stride` new
    targets per window, each with up to `context_length` tokens of context (the input window).
    Token 0 has no context and is not scored (no BOS is added; none is for SmolLM2).
    """
    out = []
    for first in range(1, n, stride):
        stop = min(first + stride, n)
        out.append((max(0, stop - 1 - context_length), first, stop))
    return out


def window_logprobs(model: Any, ids: np.ndarray, wins: list[tuple[int, int, int]], device: str, progress: Any = None):
    """Yield (first, stop, logp): log_softmax over the vocab (float32, [stop - first, vocab]) of the
    targets ids[first:stop], window by window in chunks of positions.

    Every vocabulary-sized buffer (logits, log-probs, the top-k tail's masked copy) holds at most
    HEAD_FLOATS floats: a whole 512-token window at Qwen3's 151,936-token vocabulary is 311 MB per
    buffer, several at once. When the model's logits are its head applied to its decoder's output
    (checked once, as the fast scorer does) only the decoder runs on the whole window and the head
    runs per chunk; otherwise (logit scaling, soft-capping) the full logits are computed and only
    the log-softmax and what follows are chunked.
    """
    from quantstudy.scoring.fastscore import head_is_separable

    separable = len(ids) > 0 and head_is_separable(model, int(ids[0]), device)
    with torch.inference_mode():
        for begin, first, stop in wins:
            x = torch.as_tensor(ids[begin:stop - 1], device=device)[None]
            if separable:  # [targets, d_model]; position j predicts j + 1
                hidden = model.get_decoder()(input_ids=x, use_cache=False).last_hidden_state[0, first - 1 - begin:]
                head = model.get_output_embeddings()
            else:
                hidden = model(input_ids=x, use_cache=False).logits[0, first - 1 - begin:]
                head = None
            vocab = model.get_output_embeddings().weight.shape[0] if separable else hidden.shape[-1]
            rows = max(1, HEAD_FLOATS // vocab)
            for s in range(0, stop - first, rows):
                logits = hidden[s:s + rows] if head is None else head(hidden[s:s + rows])
                yield first + s, min(first + s + rows, stop), torch.log_softmax(logits.float(), dim=-1)
            if progress is not None:
                progress()


# ------------------------------------------------------------------ KL arithmetic
def topk_tail(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (indices, log-probs) and log tail mass = logsumexp over the other tokens ([n])."""
    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return idx, vals, tail_logmass(logp, idx)


def tail_logmass(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log(sum of probs outside idx), exact even when the tail is 1e-9 (no 1 - sum cancellation)."""
    return logp.scatter(-1, idx, float("-inf")).logsumexp(-1)


def kl_topk_tail(idx: torch.Tensor, logp_k: torch.Tensor, logp_tail: torch.Tensor, logq: torch.Tensor) -> np.ndarray:
    """Per-token KL(p || q) over S = idx plus one tail bucket, in float64 ([n])."""
    lp = logp_k.double()
    lq = logq.gather(-1, idx).double()
    kl = (lp.exp() * (lp - lq)).sum(-1)
    lpt, lqt = logp_tail.double(), tail_logmass(logq, idx).double()
    tail = torch.where(torch.isneginf(lpt), torch.zeros_like(lpt), lpt.exp() * (lpt - lqt))  # 0 log 0 = 0
    return (kl + tail).cpu().numpy()


def kl_full(logp: torch.Tensor, logq: torch.Tensor) -> np.ndarray:
    """Per-token KL(p || q) over the whole vocabulary, in float64 ([n])."""
    lp, lq = logp.double(), logq.double()
    return (lp.exp() * (lp - lq)).sum(-1).cpu().numpy()
