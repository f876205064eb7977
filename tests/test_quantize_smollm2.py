"""Slow: quantize the real SmolLM2-135M with GPTQ and AWQ on CPU, reload, check perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from quantstudy.data.calibration import build_calibration, tokenize
from quantstudy.config import parse_config
from quantstudy.config.variants import expand_variants
from quantstudy.runtime.modeldir import load_pretrained
from quantstudy.stages.quantize import check_group_size, linear_shapes, run_oneshot

pytestmark = pytest.mark.slow


def perplexity(model, tok, text: str, n_tokens: int = 2048, window: int = 512) -> float:
    """exp(mean NLL) over non-overlapping windows: a plain, independent computation."""
    ids = tok(text, return_tensors="pt").input_ids[0, :n_tokens]
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, window):
            chunk = ids[s:s + window].unsqueeze(0)
            logits = model(chunk).logits.double()
            logp = torch.log_softmax(logits[0, :-1], -1).gather(1, chunk[0, 1:, None])
            nll -= logp.sum().item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_smollm2_quantizes_and_stays_sane(smollm2_dir, shared_data, tmp_path, method):
    cfg = parse_config({"name": "t", "model": {"source": str(smollm2_dir)},
                        "calibration": {"samples": 32, "max_seq_len": 256},
                        "quantize": [{"method": method, "group_size": 64}]})
    v = expand_variants(cfg)[0]
    check_group_size(linear_shapes(smollm2_dir), v)
    model, tok = load_pretrained(smollm2_dir)
    text = (shared_data / "wikitext-2-raw/wiki.test.raw").read_text()[:20000]
    base_ppl = perplexity(model, tok, text)
    cs = build_calibration(v.calibration, tok, shared_data, tmp_path)
    run_oneshot(model, tok, v, tokenize(cs, tok, 256), 256, tmp_path / "q")
    q, _ = load_pretrained(tmp_path / "q")
    q_ppl = perplexity(q, tok, text)
    print(f"{method}: baseline ppl {base_ppl:.2f}, quantized {q_ppl:.2f}")
    assert math.isfinite(q_ppl)
    assert base_ppl * 0.95 < q_ppl < base_ppl * 1.6  # W4 g64 costs a few percent, not a collapse
