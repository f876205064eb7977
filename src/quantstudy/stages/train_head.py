"""The SFT loss head on CPU: project onto the vocabulary only where a token carries loss, densely.

TRL 1.x's SFTTrainer computes the loss with a fused LM head (`trl.trainer.utils.add_fused_lm_head`):
hidden states -> per-token log-probabilities in vocabulary tiles (`ChunkedLogProbFunction`), so the
[tokens, vocab] logits never exist at once. Two things make it slow on CPU, and TRL has no option
for either:
  1. On devices without Triton it projects *every* position (prompt and padding too, so that graph
     compilers see fixed shapes); completion-only loss then multiplies most of them by zero.
  2. Its tile folds are the Triton kernels re-written as ~25 separate torch passes over each
     [tokens, 8192] tile (online max/exp/sum, entropy, top-1, then the same again in backward).
On SmolLM2 (49k vocabulary, float32, one batch of 8 rows) the head took 7.7 of 20.8 s per step.

`head_on_labelled_positions()` switches both for the duration of training, on CPU tensors only:
TRL's compact path (only labelled positions, its own code), and `dense_logprobs` instead of the tiles:
one matmul to [labelled tokens, vocab] float32 logits and torch's fused log_softmax, whose backward
autograd provides. Memory: two [labelled tokens, vocab] float32 tensors (SmolLM2, 1,500 labelled
tokens: 0.6 GB), which a CPU with room for training has. Other devices keep TRL's kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def dense_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   temperature: float, chunk_size: int, final_logit_softcapping: float | None = None,
                   logit_scale: float = 1.0, outputs: tuple[str, ...] = ("log_probs",)) -> tuple[Any, ...]:
    """Same arguments and results as TRL's `ChunkedLogProbFunction.apply`:
    hidden [N, H], weight [V, H], targets [N] -> (log_probs [N], entropy [N] | None, None, None,
    is_top1 [N] | None). Logits follow TRL's transform: scale, then softcap, then temperature."""
    del chunk_size  # one dense [N, V] block
    if {"log_sum_sq_probs", "mean_logits"} & set(outputs):
        raise NotImplementedError("dense_logprobs computes log_probs, entropy and is_top1 only")
    z = torch.nn.functional.linear(hidden, weight, bias).float()  # [N, V]; autocast may run it in bf16
    if logit_scale != 1.0:  # each of these is a pass over [N, V]: skipped when it changes nothing
        z = z * logit_scale
    if final_logit_softcapping is not None:
        z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
    if temperature != 1.0:
        z = z / temperature
    logp = torch.log_softmax(z, dim=-1)  # [N, V], one fused pass
    log_probs = logp.gather(-1, targets[:, None]).squeeze(-1)
    entropy = is_top1 = None
    if "entropy" in outputs:  # a logged metric in SFT: no gradient flows through it
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
    if "is_top1" in outputs:  # argmax takes the first maximum, as TRL's kernel does
        with torch.no_grad():
            is_top1 = z.argmax(-1) == targets
    return log_probs, entropy, None, None, is_top1


class _DenseOnCpu:
    """Stands in for TRL's `ChunkedLogProbFunction` (only `.apply` is used): dense on CPU tensors."""

    def __init__(self, original: Any):
        self.original = original

    def apply(self, hidden: torch.Tensor, *args: Any) -> tuple[Any, ...]:
        if hidden.device.type != "cpu":
            return self.original.apply(hidden, *args)
        return dense_logprobs(hidden, *args)


@contextmanager
def head_on_labelled_positions() -> Iterator[None]:
    """TRL's compact path (only positions whose next token has a label) on CPU too, computed by
    `dense_logprobs`; both module-level lookups in `trl.trainer.utils` are restored on exit. An older
    or newer TRL without them is left as it is. tests/test_train.py checks that loss and gradients
    equal TRL's own head's."""
    import trl.trainer.utils as trl_utils

    use_triton = getattr(trl_utils, "_use_triton", None)
    kernel = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if use_triton is None or kernel is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)
    trl_utils._ChunkedLogProbFunction = _DenseOnCpu(kernel)
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._ChunkedLogProbFunction = use_triton, kernel
