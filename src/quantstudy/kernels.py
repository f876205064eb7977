"""CPU matrix kernels for scoring: oneDNN instead of MKL for float32 Linear layers.

torch's CPU build sends nn.Linear to MKL sgemm. On the AMD EPYC (AVX-512) of this project's
machines MKL runs SmolLM2's shapes ([8192, 576] x [576, 1536], the [n, 576] x [576, 49152]
vocabulary projection) at 118-193 GFLOP/s, oneDNN at 163-216 (2 threads, float32, both exact
float32 FMA kernels; only the summation order differs). Scoring HellaSwag-200 in-process took
36.1 s with MKL and 25.8 s with oneDNN (median of 3), per-question log-likelihoods within
1.2e-4 nats and no greedy flag changed.

torch has no public switch for this (torch.utils.mkldnn.to_mkldnn replaces the modules and
converts every activation to and from a blocked layout), so `onednn_linear` swaps the forward
of plain float32 nn.Linear modules for the oneDNN op that torch.compile's CPU backend itself
emits, for the duration of a `with` block. It checks the op against F.linear on a probe first
and leaves the model alone where the op is missing or disagrees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def _onednn_op():
    """torch.ops.mkldnn._linear_pointwise, or None when this build lacks it or it disagrees with F.linear."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((5, 64), (24, 64), (24,)))
        ok = all(torch.allclose(op(x, w, bias, "none", [], ""), F.linear(x, w, bias), rtol=1e-4, atol=1e-5)
                 for bias in (None, b))
    except (AttributeError, RuntimeError):
        return None
    return op if ok else None


@contextlib.contextmanager
def onednn_linear(model: torch.nn.Module) -> Iterator[int]:
    """Run the model's float32 CPU nn.Linear layers on oneDNN inside the block; yields how many.

    Only exact nn.Linear instances (not LoRA or packed-quantization subclasses) with float32
    weights on the CPU are swapped; everything else runs as before.
    """
    op = _onednn_op()
    swapped = []
    if op is not None:
        for m in model.modules():
            if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32:
                # an instance attribute shadows Linear.forward; deleting it restores the class method
                m.forward = (lambda m: lambda x: op(x, m.weight, m.bias, "none", [], ""))(m)
                swapped.append(m)
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward
