"""The dense CPU loss head against TRL's tiled kernel and a float64 hand computation."""

from __future__ import annotations

import pytest
import torch
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

from quantstudy.stages.train_head import dense_logprobs, head_on_labelled_positions

OUTPUTS = ("log_probs", "entropy", "is_top1")


@pytest.mark.parametrize("softcap,scale,temperature", [(None, 1.0, 1.0), (30.0, 0.5, 0.7)])
def test_dense_head_matches_trl_kernel_and_float64(softcap, scale, temperature):
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 24, 1000  # v > TRL's chunk so its tiles fold across several vocabulary blocks
    hidden = (torch.randn(n, h, generator=g) * 2).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    bias = torch.randn(v, generator=g).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[:5] = (hidden[:5].detach() @ weight.detach().T + bias.detach()).argmax(-1)  # some top-1 hits
    grad_out = torch.randn(n, generator=g)

    def run(fn):
        for t in (hidden, weight, bias):
            t.grad = None
        lp, ent, _, _, top1 = fn(hidden, weight, bias, targets, temperature, 256, softcap, scale, OUTPUTS)
        (lp * grad_out).sum().backward()
        return lp.detach(), ent.detach(), top1, [t.grad.clone() for t in (hidden, weight, bias)]

    ours, trl = run(dense_logprobs), run(ChunkedLogProbFunction.apply)
    torch.testing.assert_close(ours[0], trl[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], trl[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[2], trl[2]) and ours[2][:5].all()
    for a, b in zip(ours[3], trl[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    z = (hidden.detach().double() @ weight.detach().double().T + bias.detach().double()) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, -1)
    torch.testing.assert_close(ours[0].double(), logp.gather(-1, targets[:, None]).squeeze(-1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours[1].double(), -(logp.exp() * logp).sum(-1), rtol=1e-6, atol=1e-4)


def test_switch_is_scoped_and_leaves_other_devices_to_trl():
    import trl.trainer.utils as trl_utils

    before = (trl_utils._use_triton, trl_utils._ChunkedLogProbFunction)
    with head_on_labelled_positions():
        assert trl_utils._use_triton(torch.device("cpu"))
        assert trl_utils._ChunkedLogProbFunction.original is before[1]
    assert (trl_utils._use_triton, trl_utils._ChunkedLogProbFunction) == before
    assert not trl_utils._use_triton(torch.device("cpu"))
