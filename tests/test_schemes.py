"""Quantization schemes beyond W4A16 (#22): config rules, the activation quantization a W8A8 checkpoint
declares applied by the evaluation path, FP4 on CPU, real bits per weight, AutoRound's per-block loss.
Real llm-compressor runs on a tiny random Llama; references are llm-compressor's own fake-quantized
model and hand computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantstudy.scoring import kernels
from quantstudy.config import load_config, parse_config
from quantstudy.errors import QuantStudyError
from quantstudy.scoring.fastscore import FastScorer
from quantstudy.runtime.modeldir import load_pretrained
from quantstudy.stages.quantize import check_group_size, linear_shapes, run_oneshot
from quantstudy.data.calibration import pack_rows
from quantstudy.config.schemes import activation_handling, bits_per_weight, prepare_loaded
from quantstudy.study import key_of
from quantstudy.config.variants import expand_variants
from tests.tiny import make_tiny_model, text

REPO = Path(__file__).resolve().parents[1]


def cfg(*entries, samples=8):
    return parse_config({"name": "t", "model": {"source": "x"}, "calibration": {"samples": samples, "max_seq_len": 64},
                         "quantize": list(entries)})


# --------------------------------------------------------------------------- config
def test_scheme_entries_expand_to_readable_names():
    c = cfg({"method": "gptq", "scheme": "W8A8", "smoothquant": {"strength": [0.5, 0.8]}},
            {"method": "rtn", "scheme": ["FP8_DYNAMIC", "NVFP4A16"]},
            {"method": ["gptq", "autoround"], "scheme": "W4A16", "group_size": 64}, samples=512)
    vs = {v.name: v for v in expand_variants(c)}
    assert list(vs) == ["gptq-w8a8-smooth0.5-c512", "gptq-w8a8-smooth0.8-c512", "rtn-fp8dyn", "rtn-nvfp4a16",
                        "gptq-w4a16g64-c512", "autoround-w4a16g64-c512"]
    w8a8 = vs["gptq-w8a8-smooth0.8-c512"]
    assert (w8a8.bits, w8a8.group_size, w8a8.smoothquant, w8a8.quantizes_activations) == (8, None, 0.8, True)
    assert "int8 dynamic per-token" in w8a8.describe() and "SmoothQuant 0.8" in w8a8.describe()
    assert (vs["rtn-nvfp4a16"].group_size, vs["rtn-nvfp4a16"].calibration) == (16, None)  # the format's groups
    assert not vs["gptq-w4a16g64-c512"].quantizes_activations


@pytest.mark.parametrize("entry, field, words", [
    ({"method": "awq", "scheme": "W8A8"}, "quantize[0].method", "use method gptq or rtn"),
    ({"method": "autoround", "scheme": "FP8_DYNAMIC"}, "quantize[0].method", "activation-quantized"),
    ({"method": "gptq", "scheme": "W8A8", "bits": 8}, "quantize[0].bits", "remove `bits`"),
    ({"method": "gptq", "scheme": "FP8_DYNAMIC", "group_size": 64}, "quantize[0].group_size", "per-channel"),
    ({"method": "gptq", "scheme": "W4A16", "smoothquant": {}}, "quantize[0].smoothquant", "use scheme: W8A8"),
    ({"method": "gptq", "smoothquant": {}}, "quantize[0].smoothquant", "weight-only"),
    ({"method": "awq", "scheme": "W8A8", "smoothquant": {}}, "quantize[0].smoothquant", "AWQ applies its own"),
])
def test_impossible_combinations_fail_at_load_with_the_fix(entry, field, words):
    with pytest.raises(QuantStudyError) as e:
        cfg(entry)
    assert str(e.value).startswith(field) and words in str(e.value) and "Fix:" in str(e.value)


def test_unknown_scheme_is_one_load_error_listing_the_schemes():
    with pytest.raises(QuantStudyError, match=r"quantize\[0\]\.scheme: 'W9A9' is not allowed.*'W8A8'"):
        cfg({"method": "gptq", "scheme": "W9A9"})


# quantize-stage keys of the existing studies, computed with the code before schemes existed (commit
# 0faf6ab: `key_of("quantize", v)` for each expanded variant); new fields at their defaults must not move them
OLD_KEYS = {"smollm2-demo": {"gptq-w4g64-c32": "2cbf6722aa5a8352cf0d260d", "awq-w4g64-c32": "2fc101ac349733e1ca1a1dd9",
                             "rtn-w4g64": "f3fc6570050d14916975c6f0"},
            "seed-000-smollm2": {"gptq-w4g64-c100": "38d5ee3d2179b39a2975838d"},
            "qwen3-4b-gptq-awq": {"gptq-w4g128-c215": "ee9409fce273d89ed14b246f",
                                  "gptq-w4g128-c512": "d1c89d7d9c7388a54c31ae76",
                                  "awq-w4g128-c215": "8994fe5e2c9533ef4df24606",
                                  "awq-w4g128-c512": "9016faf4cc9ae0042ac736b7"}}


@pytest.mark.parametrize("study", sorted(OLD_KEYS))
def test_existing_studies_keep_their_quantize_keys(study):
    c = load_config(REPO / "studies" / f"{study}.yaml")
    assert {v.name: key_of("quantize", v) for v in expand_variants(c)} == OLD_KEYS[study]
    assert all("scheme" not in str(v) and "autoround" not in str(v) for v in expand_variants(c))
    set_ = expand_variants(cfg({"method": "gptq", "scheme": "W4A16", "group_size": 64}))[0]
    assert "scheme=<Scheme.W4A16" in str(set_)  # and a variant that sets it is keyed by it


# --------------------------------------------------------------------------- real runs on a tiny model
@pytest.fixture(scope="module")
def tiny96(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("s") / "m", hidden=96, intermediate=192)


def quantize(tiny: Path, out: Path, entry: dict) -> tuple[Path, torch.nn.Module, dict]:
    """Quantize; return the checkpoint, llm-compressor's in-memory (fake-quantized) model and the layer rows."""
    from tests.test_quantize import calib_dataset

    v = expand_variants(cfg(entry))[0]
    model, tok = load_pretrained(tiny)
    ds = None if v.calibration is None else calib_dataset(tok)
    if v.method.value == "autoround":  # rows of one length, as the quantize stage gives AutoRound
        ds = pack_rows(ds, 32)
    rows, _ = run_oneshot(model, tok, v, ds, 64, out)
    return out, model.eval(), rows


def pairs(tok, n=6):
    ids = [tok(text(40 + i, 25))["input_ids"] for i in range(n)]
    return [(x[:12], x[12:]) for x in ids]


def reference_loglik(model, prs) -> list[float]:
    out = []
    with torch.no_grad():
        for ctx, cont in prs:
            logp = model(torch.tensor([ctx + cont[:-1]])).logits.float().log_softmax(-1)[0]
            out.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


def test_w8a8_is_scored_with_its_activation_quantization(tiny96, tmp_path):
    """The evaluation path (load_pretrained + FastScorer, whose float32 Linear layers run on oneDNN)
    applies W8A8's per-token int8 input quantization: its log-likelihoods equal llm-compressor's own
    fake-quantized model's and differ from the same weights with 16-bit activations (W8A16)."""
    out, fake, _ = quantize(tiny96, tmp_path / "w8a8", {"method": "rtn", "scheme": "W8A8"})
    model, tok = load_pretrained(out)
    handling = prepare_loaded(model)
    assert handling["activations_quantized"] and handling["quantized_layers"] == 2 * 7
    assert list(handling["kinds"]) == ["int8 dynamic per-token"]
    q = model.model.layers[0].mlp.down_proj
    wrapper = q.__dict__["forward"]
    prs = pairs(tok)
    want = reference_loglik(fake, prs)
    got = [lp for lp, _ in FastScorer(model, tok, batch_size=4).score_tokens(prs)]
    assert got == pytest.approx(want, abs=2e-4)
    assert q.__dict__["forward"] is wrapper  # the quantization wrapper survives scoring
    assert reference_loglik(model, prs) == pytest.approx(want, abs=2e-4)  # and still runs afterwards

    a16, _ = load_pretrained(out)  # the same int8 weights, inputs left in float32
    for m in a16.modules():
        if getattr(m, "quantization_scheme", None) is not None:
            m.quantization_enabled = False  # weights are already dequantized: only the input QDQ goes
    assert activation_handling(a16)["quantized_layers"] == 0
    w8a16 = [lp for lp, _ in FastScorer(a16, tok, batch_size=4).score_tokens(prs)]
    gap = max(abs(x - y) for x, y in zip(w8a16, want))
    assert gap > 50 * 2e-4, gap  # activation quantization is visible at this tolerance


def test_onednn_swap_keeps_weight_only_models_fast_and_restores_wrappers(tiny96, tmp_path):
    out, _, _ = quantize(tiny96, tmp_path / "w4", {"method": "rtn", "scheme": "W4A16", "group_size": 32})
    model, _ = load_pretrained(out)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    before = {id(m): m.__dict__.get("forward") for m in linears}
    assert all(f is not None for f in before.values())  # compressed-tensors wraps every module it loads
    with kernels.onednn_linear(model) as n:
        if kernels._onednn_op() is not None:
            assert n == len(linears) == 2 * 7 + 1  # weight-only wrappers compute F.linear: all swapped
    assert all(m.__dict__.get("forward") is before[id(m)] for m in linears)


def test_bits_per_weight_include_scales(tiny96, tmp_path):
    # per block: in x out of q, k, v, o, gate, up, down
    shapes = [(96, 96), (96, 48), (96, 48), (96, 96), (96, 192), (96, 192), (192, 96)]
    weights = 2 * sum(i * o for i, o in shapes)
    out_rows = 2 * sum(o for _, o in shapes)
    cases = {  # scheme -> hand count of bits per weight (float32 scales: the model's dtype; fp8/e8m0 scales 8 bits)
        ("W8A8", None): 8 + 32 * out_rows / weights,  # one float32 scale per output row
        ("W4A16", 32): 4 + 32 / 32,  # one float32 scale per 32 weights, symmetric: no zero point
        ("NVFP4A16", None): 4 + 8 / 16 + 32 * 14 / weights,  # fp8 scale per 16, one float32 global scale per layer
        ("MXFP4A16", None): 4 + 8 / 32,  # one power-of-two (uint8) scale per 32
    }
    for (scheme, g), want in cases.items():
        entry = {"method": "rtn", "scheme": scheme, **({"group_size": g} if g else {})}
        out, _, _ = quantize(tiny96, tmp_path / scheme, entry)
        got = bits_per_weight(out)
        assert got["bits_per_weight"] == pytest.approx(want, rel=1e-9), scheme
        assert got["quantized_weights"] == weights


def test_fp4_runs_in_float32_after_loading(tiny96, tmp_path):
    """NVFP4A16/MXFP4A16 decompress to bf16 weights inside a float32 model; a float32 forward then fails
    in torch. prepare_loaded casts them (exactly) and the model runs; MXFP4's weights sit on the FP4
    grid: at most 15 distinct values (E2M1: +-{0, .5, 1, 1.5, 2, 3, 4, 6}) per group of 32."""
    for scheme in ("NVFP4A16", "MXFP4A16"):
        out, _, _ = quantize(tiny96, tmp_path / scheme, {"method": "rtn", "scheme": scheme})
        model, tok = load_pretrained(out)
        w = model.model.layers[0].mlp.down_proj.weight
        assert w.dtype == torch.bfloat16
        ids = torch.tensor([tok(text(3, 20))["input_ids"]])
        with pytest.raises(RuntimeError, match="dtype"), torch.no_grad():
            model(ids)  # if torch or compressed-tensors starts handling this, the cast can go
        bf16 = w.detach().clone()
        handling = prepare_loaded(model)
        assert handling["weights_cast_to_model_dtype"] == 2 * 7 and not handling["activations_quantized"]
        w = model.model.layers[0].mlp.down_proj.weight
        assert w.dtype == torch.float32 and torch.equal(w.to(torch.bfloat16), bf16)
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()
        if scheme == "MXFP4A16":
            groups = w.detach().reshape(w.shape[0], -1, 32)
            assert max(len(torch.unique(groups[r, j])) for r in range(0, w.shape[0], 5)
                       for j in range(groups.shape[1])) <= 15


def test_group_size_check_applies_to_scheme_presets(tiny96):
    shapes = linear_shapes(tiny96)  # widths 96 and 192: W4A16's preset 128 does not divide them
    with pytest.raises(QuantStudyError, match="group_size 128 does not divide"):
        check_group_size(shapes, expand_variants(cfg({"method": "gptq", "scheme": "W4A16"}))[0])
    check_group_size(shapes, expand_variants(cfg({"method": "rtn", "scheme": "MXFP4A16"}))[0])  # 32 divides


def test_autoround_records_its_per_block_loss(tiny96, tmp_path):
    """AutoRound's loss per decoder block comes through the standard logging module; it is stored like
    GPTQ's per-layer error. torch.compile stays off on a CPU (compiling costs more than it saves)."""
    v = expand_variants(cfg({"method": "autoround", "scheme": "W4A16", "group_size": 32,
                             "autoround": {"iters": 3, "batch_size": 4}}))[0]
    from quantstudy.stages.quantize import autoround_compile

    assert autoround_compile(v) is torch.cuda.is_available()
    _, _, rows = quantize(tiny96, tmp_path / "ar", {"method": "autoround", "scheme": "W4A16", "group_size": 32,
                                                    "autoround": {"iters": 3, "batch_size": 4}})
    assert sorted(rows) == ["model.layers.0", "model.layers.1"]
    assert all(r["error"] >= 0 and r["error"] <= r["initial_error"] for r in rows.values())


def test_autoround_tunes_against_the_layers_own_output(tiny96, tmp_path, monkeypatch):
    """AutoRound's reference for a decoder block must be that block's real output on the calibration
    text (llm-compressor hands auto-round each layer's captured call: inputs, causal mask, positions;
    a wrong capture would make AutoRound tune towards the wrong targets). Reference: the float model's
    own hidden states, sample by sample."""
    from auto_round.algorithms import composer

    from tests.test_quantize import calib_dataset

    v = expand_variants(cfg({"method": "autoround", "scheme": "W4A16", "group_size": 32,
                             "autoround": {"iters": 1, "batch_size": 4}}))[0]
    model, tok = load_pretrained(tiny96)
    ds = pack_rows(calib_dataset(tok), 32)
    with torch.no_grad():
        want = [model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1] for ids in ds["input_ids"]]
    refs: list[list[torch.Tensor]] = []
    original = composer.AlgorithmComposer.compress_block

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        refs.append(out[1])  # (quantized outputs, float reference outputs) of this block
        return out

    monkeypatch.setattr(composer.AlgorithmComposer, "compress_block", spy)
    run_oneshot(model, tok, v, ds, 64, tmp_path / "ar")
    got = refs[0]  # block 0: one [1, 32, hidden] tensor per row, in llm-compressor's order
    for w in want:  # each row's reference is its own layer-0 output
        err = min((g - w).norm() / w.norm() for g in got)
        assert err < 1e-5


# --------------------------------------------------------------------------- report
def test_report_pairs_schemes_at_equal_method():
    from quantstudy.report.analysis import ModelInfo, PairKind, plan_pairs

    cal = {"source": "sharegpt", "samples": 32, "max_seq_len": 256, "seed": 0}

    def info(name, method, scheme, bits, group, smooth=None, calib=cal, acts=None):
        spec = {"method": method, "bits": bits, "group_size": group, "symmetric": True, "ignore": ["lm_head"],
                "calibration": calib, "scheme": scheme, "scheme_named": True, "smoothquant": smooth, "activations": acts}
        return ModelInfo(name, "quantized", "base", name, "/x", 1, spec, "h")

    models = [ModelInfo("base", "baseline", None, "original weights", "/b", 2, {}, "b"),
              info("gptq-w4a16g64-c32", "gptq", "W4A16", 4, 64),
              info("autoround-w4a16g64-c32", "autoround", "W4A16", 4, 64),
              info("gptq-w8a8-smooth0.8-c32", "gptq", "W8A8", 8, None, 0.8, acts="int8 dynamic per-token"),
              info("rtn-fp8dyn", "rtn", "FP8_DYNAMIC", 8, None, calib=None, acts="fp8"),
              info("rtn-nvfp4a16", "rtn", "NVFP4A16", 4, 16, calib=None)]
    got = {(p.kind, p.ref, p.other) for p in plan_pairs(models) if p.kind != PairKind.parent}
    assert got == {(PairKind.method, "gptq-w4a16g64-c32", "autoround-w4a16g64-c32"),
                   (PairKind.scheme, "gptq-w4a16g64-c32", "gptq-w8a8-smooth0.8-c32"),
                   (PairKind.scheme, "rtn-fp8dyn", "rtn-nvfp4a16")}
    title = next(p.title for p in plan_pairs(models) if p.kind == PairKind.scheme and p.ref.startswith("gptq"))
    assert title.startswith("W8A8 vs W4A16 at the same method (GPTQ, 32 sharegpt")
    # stores made before schemes existed record none: their W4 vs W8 variants stay unpaired, as before
    for m in models[1:]:
        del m.spec["scheme"], m.spec["scheme_named"]
    assert not [p for p in plan_pairs(models) if p.kind == PairKind.scheme]


@pytest.mark.parametrize("entries", [
    [{"method": "gptq", "bits": [3, 4], "group_size": 64}],  # a study written before schemes existed
    [{"method": ["gptq", "awq"], "bits": [3, 4, 8]}, {"method": "rtn", "bits": [4, 8]}],
])
def test_bits_only_studies_pair_as_before_schemes(entries):
    """Entries that set only `bits` store a derived scheme (W3A16, W4A16) since #22; re-running such a study
    must not add W3A16-vs-W4A16 'scheme' comparisons to its Holm family: its pairs are those the report
    made from specs that recorded no scheme. A study that names schemes gets them."""
    from quantstudy.report.analysis import ModelInfo, PairKind, plan_pairs
    from quantstudy.stages.quantize import variant_spec

    def models(c, strip=False):
        out = [ModelInfo("base", "baseline", None, "original weights", "/b", 2, {}, "b")]
        for v in expand_variants(c):
            cal = None if v.calibration is None else {"source": v.calibration.source.value,
                                                      "samples": v.calibration.samples, "max_seq_len": 64, "seed": 0}
            spec = {**variant_spec(v), "calibration": cal}
            if strip:  # what the quantize stage stored before #22
                spec = {k: x for k, x in spec.items() if k not in ("scheme", "scheme_named", "activations",
                                                                   "smoothquant", "autoround")}
            out.append(ModelInfo(v.name, "quantized", "base", v.describe(), "/x", 1, spec, "h"))
        return out

    def pairs(ms):
        return sorted((p.kind.value, p.ref, p.other) for p in plan_pairs(ms))

    c = cfg(*entries)
    assert pairs(models(c)) == pairs(models(c, strip=True))
    assert not [p for p in plan_pairs(models(c)) if p.kind == PairKind.scheme]
    # specs written by #22's first version have no scheme_named: the description tells (it names a named scheme)
    old22 = models(c)
    for m in old22[1:]:
        del m.spec["scheme_named"]
    assert pairs(old22) == pairs(models(c))
    named = models(cfg({"method": "gptq", "scheme": ["W4A16", "W8A16"], "group_size": 64}))
    for m in named[1:]:
        del m.spec["scheme_named"]
    assert [p.title for p in plan_pairs(named) if p.kind == PairKind.scheme] == [
        "W8A16 vs W4A16 at the same method (GPTQ, 8 sharegpt calibration samples)"]


def test_autoround_options_key_only_autoround_variants():
    """Changing AutoRound's iterations must not re-run the GPTQ variant of the same entry."""
    def keys(iters):
        c = cfg({"method": ["gptq", "autoround"], "scheme": "W4A16", "group_size": 64, "autoround": {"iters": iters}})
        return {v.name: key_of("quantize", v) for v in expand_variants(c)}

    a, b = keys(20), keys(50)
    assert a["gptq-w4a16g64-c8"] == b["gptq-w4a16g64-c8"]
    assert a["autoround-w4a16g64-c8"] != b["autoround-w4a16g64-c8"]


def test_a_group_size_applies_to_the_schemes_of_a_list_that_take_one():
    """`scheme: [W4A16, W8A8]` with `group_size: 64`: W4A16 gets groups of 64, W8A8 keeps its per-channel
    layout; a group size on a fixed-layout scheme alone is still refused with the fix."""
    from quantstudy.config.variants import expand_variants

    cfg = parse_config({"name": "t", "model": {"source": "x"},
                        "quantize": [{"method": "gptq", "scheme": ["W4A16", "W8A8"], "group_size": 64}]})
    assert [(v.name, v.group_size) for v in expand_variants(cfg)] == [("gptq-w4a16g64-c64", 64),
                                                                      ("gptq-w8a8-c64", None)]
    with pytest.raises((QuantStudyError, ValueError), match="remove `group_size`"):
        parse_config({"name": "t", "model": {"source": "x"},
                      "quantize": [{"method": "gptq", "scheme": "W8A8", "group_size": 64}]})


# --------------------------------------------------------------------------- AutoRound's rows
def _ragged(ds):
    """Rows of different lengths (row i: 20 + 5i tokens), as rendered conversations are."""
    from datasets import Dataset

    return Dataset.from_dict({k: [r[:20 + 5 * i] for i, r in enumerate(ds[k])] for k in ("input_ids", "attention_mask")})


def test_autoround_calibrates_on_packed_rows_of_one_length(tiny96):
    """llm-compressor 0.14 pads rows of different lengths into AutoRound's loss (see pack_rows): the
    rows AutoRound gets are the calibration tokens end to end, cut into rows of exactly max_seq_len."""
    from tests.test_quantize import calib_dataset

    _, tok = load_pretrained(tiny96)
    ds = _ragged(calib_dataset(tok))
    assert len({len(r) for r in ds["input_ids"]}) > 1
    packed = pack_rows(ds, 20)
    flat = [t for r in ds["input_ids"] for t in r]
    assert {len(r) for r in packed["input_ids"]} == {20} and len(packed) == len(flat) // 20
    assert [t for r in packed["input_ids"] for t in r] == flat[:len(packed) * 20]  # in order, only the tail dropped
    assert all(m == [1] * 20 for m in packed["attention_mask"])
    with pytest.raises(QuantStudyError, match="calibration.max_seq_len"):
        pack_rows(ds, len(flat) + 1)


def test_autoround_refuses_rows_of_different_lengths(tiny96, tmp_path):
    from tests.test_quantize import calib_dataset

    v = expand_variants(cfg({"method": "autoround", "scheme": "W4A16", "group_size": 32,
                             "autoround": {"iters": 1, "batch_size": 4}}))[0]
    model, tok = load_pretrained(tiny96)
    with pytest.raises(QuantStudyError, match="different lengths"):
        run_oneshot(model, tok, v, _ragged(calib_dataset(tok)), 64, tmp_path / "ar")
