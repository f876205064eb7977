"""Quantization through llm-compressor on tiny random models: real runs, checked independently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantstudy.config import parse_config
from quantstudy.config.variants import expand_variants
from quantstudy.errors import QuantStudyError
from quantstudy.runtime.modeldir import load_pretrained
from quantstudy.stages.quantize import check_group_size, linear_shapes, run_oneshot
from tests.tiny import make_tiny_model, text


@pytest.fixture(scope="module")
def tiny96(tmp_path_factory) -> Path:
    # hidden 96: divisible by 32 but not by 64 or 128 (like SmolLM2's 576 and g128)
    return make_tiny_model(tmp_path_factory.mktemp("q") / "m", hidden=96, intermediate=192)


def variant(method: str, group, bits: int = 4, sym: bool = True):
    c = parse_config({"name": "t", "model": {"source": "x"}, "calibration": {"samples": 8, "max_seq_len": 64},
                      "quantize": [{"method": method, "group_size": group, "bits": bits, "symmetric": sym}]})
    return expand_variants(c)[0]


def test_group_size_check_lists_layers_and_working_sizes(tiny96):
    shapes = linear_shapes(tiny96)
    with pytest.raises(QuantStudyError) as e:
        check_group_size(shapes, variant("gptq", 64))
    msg = str(e.value)
    assert "[96]" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert "use group_size 32 or channel" in msg
    check_group_size(shapes, variant("gptq", 32))  # 96 and 192 are multiples of 32
    check_group_size(shapes, variant("gptq", "channel"))


def calib_dataset(tok, n=8):
    from datasets import Dataset

    enc = tok([text(100 + i, 60) for i in range(n)], truncation=True, max_length=64)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def levels_per_group(w: torch.Tensor, group: int) -> int:
    """Most distinct values in any quantization group of a dequantized weight (rows x in)."""
    g = w.reshape(w.shape[0], -1, group)
    return max(len(torch.unique(g[r, j])) for r in range(0, w.shape[0], 7) for j in range(g.shape[1]))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantized_model_reloads_on_a_4bit_grid(tiny96, tmp_path, method):
    v = variant(method, 32)
    model, tok = load_pretrained(tiny96)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    ds = None if method == "rtn" else calib_dataset(tok)
    rows, seconds = run_oneshot(model, tok, v, ds, 64, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "config.json").is_file() and not list(tmp_path.glob("out.*.tmp"))
    import json

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)
    reloaded, _ = load_pretrained(out)
    w = reloaded.model.layers[0].mlp.down_proj.weight.detach()
    assert levels_per_group(w, 32) <= 16  # 4 bits: at most 16 levels per group
    assert levels_per_group(before, 32) > 16
    rel = (w - before).norm() / before.norm()
    assert 0 < rel < 0.5  # quantized, but still close to the original weights
    if method == "gptq":
        assert len(rows) == 2 * 7 and all("error" in r and "time" in r for r in rows.values())
    if method == "awq":
        assert rows, "AWQ reports per-mapping errors"


def test_asymmetric_8bit_channel(tiny96, tmp_path):
    model, tok = load_pretrained(tiny96)
    run_oneshot(model, tok, variant("rtn", "channel", bits=8, sym=False), None, 64, tmp_path / "o")
    w = load_pretrained(tmp_path / "o")[0].model.layers[1].self_attn.o_proj.weight.detach()
    assert max(len(torch.unique(w[r])) for r in range(w.shape[0])) <= 256
