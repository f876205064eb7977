"""oneDNN Linear swap: same numbers as F.linear / a float64 reference, and the model is restored."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantstudy.scoring import kernels
from quantstudy.scoring.fastscore import FastScorer

needs_op = pytest.mark.skipif(kernels._onednn_op() is None, reason="this torch build has no oneDNN linear op")


@pytest.fixture(scope="module")
def model32():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float().eval()


@needs_op
def test_swap_matches_float64_and_restores(model32):
    ids = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    ref64 = copy.deepcopy(model32).double()
    with torch.no_grad():
        before = model32(ids).logits
        with kernels.onednn_linear(model32) as n:
            inside = model32(ids).logits
        after = model32(ids).logits
        exact = ref64(ids).logits
    assert n == sum(type(m) is torch.nn.Linear for m in model32.modules()) == 2 * 7 + 1
    # float32 rounding only: both kernels land as close to the float64 result
    assert (inside.double() - exact).abs().max() < 1e-4
    assert (inside.double() - exact).abs().max() <= 4 * (before.double() - exact).abs().max() + 1e-6
    assert torch.equal(before, after)  # Linear.forward is back
    assert not any("forward" in m.__dict__ for m in model32.modules())


def test_only_float32_cpu_linears_are_swapped(model32, monkeypatch):
    with kernels.onednn_linear(copy.deepcopy(model32).double()) as n:
        assert n == 0
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with kernels.onednn_linear(model32) as n:
        assert n == 0


@needs_op
def test_fast_scorer_on_onednn_matches_float64_full_sequences(model32):
    class Tok:  # FastScorer only needs these for token-level scoring
        bos_token_id = eos_token_id = pad_token_id = 0
        model_max_length = 64

        def decode(self, ids):
            return "<s>"

    sc = FastScorer(model32, Tok(), batch_size=4)
    g = torch.Generator().manual_seed(2)
    stem = torch.randint(1, 300, (20,), generator=g).tolist()
    pairs = [(stem[:4 + k], torch.randint(1, 300, (1 + c,), generator=g).tolist()) for k in range(6) for c in range(3)]
    ref64 = copy.deepcopy(model32).double()
    got = sc.score_tokens(pairs)
    for (ctx, cont), (lp, _) in zip(pairs, got):
        with torch.no_grad():
            logp = ref64(torch.tensor([ctx + cont[:-1]])).logits.log_softmax(-1)[0]
        want = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        assert lp == pytest.approx(want, abs=1e-4)
