"""Packed int4 kernels against compressed-tensors' own decompression (the reference).

The packed layer must give what the evaluated (decompressed) model gives: equal to a bf16
decompression up to output rounding, and within bf16 tolerance of the float32 decompression.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantstudy.errors import QuantStudyError
from quantstudy.runtime.modeldir import load_pretrained
from quantstudy.scoring.packed import (PackedBackend, PackedLinear, inner_k_tiles, int4_values, load_packed, pack_cuda_input,
                               pack_layer, why_dense, zero_points)
from tests.tiny import make_tiny_model, text


def ct_decompress(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, group: int | None) -> torch.Tensor:
    """Pack with compressed-tensors and decompress with compressed-tensors: the reference weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=zp is None,
                            strategy="group" if group else "channel", group_size=group)
    sd = {"weight_packed": pack_to_int32(q, 4), "weight_scale": scale, "weight_shape": torch.tensor(q.shape)}
    if zp is not None:
        sd["weight_zero_point"] = pack_to_int32(zp, 4, packed_dim=0)
    return PackedQuantizationCompressor.decompress(sd, QuantizationScheme(targets=["Linear"], weights=args))["weight"]


def check_against_reference(layer: PackedLinear, w32: torch.Tensor, x: torch.Tensor) -> None:
    """Packed output == bf16 decompression (to output rounding) and ~= float32 decompression."""
    y = layer(x.bfloat16()).float()
    y16 = F.linear(x.bfloat16(), w32.bfloat16()).float()
    y32 = F.linear(x.float(), w32.float())
    scale = y32.abs().max()
    # bf16 keeps 8 significant bits: one rounding of the output is <= 2^-8 relative; the two
    # bf16 paths differ only in summation order and that rounding
    assert (y - y16).abs().max() <= 2 ** -7 * scale, (y - y16).abs().max()
    # against float32: the scale (and zero) rounded to bf16 adds another <= 2^-9 per weight
    assert (y - y32).abs().max() <= 2 ** -6 * scale, (y - y32).abs().max()
    rel = ((y - y32).norm() / y32.norm()).item()
    assert rel < 0.01, rel
    assert not torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, None])
def test_layout_matches_compressed_tensors(sym, group):
    g = torch.Generator().manual_seed(1)
    n, k = 48, 256
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    ng = k // group if group else 1
    scale = torch.rand(n, ng, generator=g) * 0.02 + 0.001
    zp = None if sym else torch.randint(-8, 8, (n, ng), generator=g, dtype=torch.int8)
    w32 = ct_decompress(q, scale, zp, group)
    # unpacking through our path must reproduce the integers compressed-tensors packed
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    assert torch.equal(int4_values(pack_to_int32(q, 4), (n, k)), q)
    if zp is not None:
        assert torch.equal(zero_points(pack_to_int32(zp, 4, packed_dim=0), n, ng), zp)
    layer = pack_layer(q, scale, zp, None, PackedBackend.cpu, "cpu")
    check_against_reference(layer, w32, torch.randn(7, k, generator=g))
    check_against_reference(layer, w32, torch.randn(2, 3, k, generator=g).reshape(6, k))


def test_a_wrong_layout_would_be_caught():
    """The check can fail: swapping nibble order (the plausible mistake) breaks it."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-8, 8, (32, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(32, 2, generator=g) * 0.02 + 0.001
    w32 = ct_decompress(q, scale, None, 32)
    swapped = q.reshape(32, 32, 2).flip(-1).reshape(32, 64)
    with pytest.raises(AssertionError):
        check_against_reference(pack_layer(swapped, scale, None, None, PackedBackend.cpu, "cpu"), w32,
                                torch.randn(5, 64, generator=g))


def test_unsupported_layers_have_reasons():
    assert why_dense(64, 128, 4, 4, PackedBackend.cpu) is None  # g32
    assert "not a multiple of 16" in why_dense(40, 128, 4, 4, PackedBackend.cpu)
    assert why_dense(40, 128, 4, 4, PackedBackend.cuda) is None  # CUDA tiles need N % 8
    assert "group size 16" in why_dense(64, 128, 8, 4, PackedBackend.cpu)
    assert "8-bit" in why_dense(64, 128, 4, 8, PackedBackend.cpu)
    assert why_dense(64, 136, 1, 4, PackedBackend.cpu) is not None  # channel, no kernel group divides 136


def test_cuda_packing_layout_and_shape():
    """The CUDA packer's input (uint8 [N, K/2], even column in the high nibble) and the packed
    shape from torch's own meta kernel; the CUDA op itself cannot run on this CPU build."""
    u = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]], dtype=torch.int32)
    assert pack_cuda_input(u).tolist() == [[0x12, 0x34], [0xF0, 0x78]]
    n, k = 64, 576
    t = inner_k_tiles(k)
    assert k % (t * 16) == 0 and t in (2, 4, 8)
    out = torch.ops.aten._convert_weight_to_int4pack(torch.empty(n, k // 2, dtype=torch.uint8, device="meta"), t)
    assert tuple(out.shape) == (n // 8, k // (t * 16), 32, t // 2) and out.dtype == torch.int32


def rtn_model(root: Path, sym: bool, group: int | None, intermediate: int = 128) -> Path:
    """A tiny random Llama quantized by llm-compressor RTN (no calibration: seconds)."""
    from quantstudy.config import parse_config
    from quantstudy.stages.quantize import run_oneshot
    from quantstudy.config.variants import expand_variants

    base = make_tiny_model(root / "base", hidden=64, intermediate=intermediate)
    cfg = parse_config({"name": "t", "model": {"source": str(base)},
                        "quantize": [{"method": "rtn", "group_size": group or "channel", "symmetric": sym}]})
    model, tok = load_pretrained(base)
    run_oneshot(model, tok, expand_variants(cfg)[0], None, 0, root / "q")
    return root / "q"


@pytest.mark.parametrize("sym", [True, False])
def test_tiny_rtn_model_packed_equals_decompressed(tmp_path, sym):
    path = rtn_model(tmp_path, sym, 32)
    packed, tok, rep = load_packed(path)
    assert rep.backend == PackedBackend.cpu and not rep.dense
    assert len(rep.packed) == 2 * 7  # every Linear of both layers; lm_head is ignored by the recipe
    dense, _ = load_pretrained(path)  # transformers + compressed-tensors decompression, float32
    assert not any(p.is_meta for p in packed.parameters())
    g = torch.Generator().manual_seed(3)
    for name in rep.packed:
        layer = packed.get_submodule(name)
        check_against_reference(layer, dense.get_submodule(name).weight.detach(),
                                torch.randn(9, layer.in_features, generator=g))
    ids = torch.tensor([tok.encode(text(7, 30))])
    with torch.inference_mode():
        a, b = packed(ids).logits.float(), dense(ids).logits.float()
    assert ((a - b).norm() / b.norm()).item() < 0.02
    # the packed model holds ~1/4 byte + scales per quantized weight: well under the dense bf16 size
    dense_bytes = sum(p.numel() * 2 for p in dense.parameters())
    assert rep.resident_bytes < dense_bytes


def test_channel_and_odd_widths_stay_dense_and_are_listed(tmp_path):
    # intermediate 136: gate/up have N=136 (not % 16), down_proj has K=136 (no kernel group divides it)
    path = rtn_model(tmp_path, True, None, intermediate=136)
    packed, _, rep = load_packed(path)
    assert set(rep.dense) == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj",
                                                                                         "down_proj")}
    assert "model.layers.0.self_attn.q_proj" in rep.packed  # channel scale repeated over g64
    dense, _ = load_pretrained(path)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    check_against_reference(packed.get_submodule("model.layers.0.self_attn.q_proj"),
                            dense.get_submodule("model.layers.0.self_attn.q_proj").weight.detach(), x)
    # a layer left dense holds compressed-tensors' decompression in bf16
    w = packed.get_submodule("model.layers.1.mlp.up_proj").weight
    ref = dense.get_submodule("model.layers.1.mlp.up_proj").weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, ref.detach().bfloat16())


def test_dense_model_is_refused(tmp_path):
    base = make_tiny_model(tmp_path / "m")
    with pytest.raises(QuantStudyError) as e:
        load_packed(base)
    assert "evaluate.speed.backend" in str(e.value) and "dense" in str(e.value)


# ------------------------------------------------------------------ real SmolLM2 weights (slow)
SMOL_VARIANTS = {"gptq": ("gptq", True), "awq": ("awq", True), "rtn-asym": ("rtn", False)}


@pytest.fixture(scope="session")
def smol_quantized(smollm2_dir, shared_data, tmp_path_factory) -> dict[str, Path]:
    """SmolLM2-135M quantized by llm-compressor at W4 g64: GPTQ, AWQ (symmetric) and RTN asymmetric.

    QS_PACKED_SMOL=DIR reuses models already made there as DIR/{gptq-w4g64, awq-w4g64, rtn-w4g64-asym}
    (AWQ takes ~6 min on 2 CPU cores)."""
    from quantstudy.data.calibration import build_calibration, tokenize
    from quantstudy.config import parse_config
    from quantstudy.stages.quantize import run_oneshot
    from quantstudy.config.variants import expand_variants

    if os.environ.get("QS_PACKED_SMOL"):
        d = Path(os.environ["QS_PACKED_SMOL"])
        return {"gptq": d / "gptq-w4g64", "awq": d / "awq-w4g64", "rtn-asym": d / "rtn-w4g64-asym"}
    root, out = tmp_path_factory.mktemp("smol-packed"), {}
    for key, (method, sym) in SMOL_VARIANTS.items():
        cfg = parse_config({"name": "t", "model": {"source": str(smollm2_dir)},
                            "calibration": {"samples": 8, "max_seq_len": 128},
                            "quantize": [{"method": method, "group_size": 64, "symmetric": sym}]})
        v = expand_variants(cfg)[0]
        model, tok = load_pretrained(smollm2_dir)
        ds = None if v.calibration is None else tokenize(build_calibration(v.calibration, tok, shared_data, root),
                                                         tok, 128)
        run_oneshot(model, tok, v, ds, 128, root / key)
        out[key] = root / key
    return out


@pytest.mark.slow
@pytest.mark.parametrize("key", list(SMOL_VARIANTS))
def test_smollm2_packed_equals_decompressed(smol_quantized, shared_data, key):
    path = smol_quantized[key]
    packed, tok, rep = load_packed(path)
    assert not rep.dense and len(rep.packed) == 30 * 7  # every decoder Linear of SmolLM2's 30 layers
    dense, _ = load_pretrained(path)  # compressed-tensors' decompression, float32: what the evaluation scores
    text = (shared_data / "wikitext-2-raw/wiki.test.raw").read_text()[:3000]
    ids = torch.tensor([tok.encode(text)[:256]])
    # per layer: the real inputs each layer sees in the decompressed model
    seen: dict[str, torch.Tensor] = {}
    names = [n for n in rep.packed if n.startswith(("model.layers.0.", "model.layers.29."))]
    hooks = [dense.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach()[0])) for n in names]
    with torch.inference_mode():
        lq = torch.log_softmax(dense(ids).logits[0].float(), -1)
        lp = torch.log_softmax(packed(ids).logits[0].float(), -1)
    for h in hooks:
        h.remove()
    for n in names:
        check_against_reference(packed.get_submodule(n), dense.get_submodule(n).weight.detach(), seen[n])
    kl = (lq.exp() * (lq - lp)).sum(-1).mean().item()
    agree = (lq.argmax(-1) == lp.argmax(-1)).float().mean().item()
    # the reference for "within bf16 tolerance": the same decompressed weights run dense in bf16. The
    # packed model may differ from float32 only as much as bf16 activations do (30 layers of bf16
    # rounding flip near-tied top-1 tokens: ~5% of positions on this text), not more.
    bf16, _ = load_pretrained(path, dtype="bfloat16")
    with torch.inference_mode():
        lb = torch.log_softmax(bf16(ids).logits[0].float(), -1)
    kl_b = (lq.exp() * (lq - lb)).sum(-1).mean().item()
    agree_b = (lq.argmax(-1) == lb.argmax(-1)).float().mean().item()
    print(f"{key}: KL(decompressed || packed) {kl:.5f} nats/token, top-1 agreement {agree:.3f}; "
          f"dense bf16: {kl_b:.5f}, {agree_b:.3f}")
    assert kl < 0.01 and kl < 1.5 * kl_b + 1e-4 and agree >= agree_b - 0.02
    # 4-bit packed + bf16 scales vs the float32 dense model: resident bytes well under half
    assert rep.resident_bytes < 0.5 * sum(p.numel() * 4 for p in dense.parameters())
