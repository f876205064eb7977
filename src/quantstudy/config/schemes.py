"""Quantization schemes: which compressed-tensors presets a study may name, what each does to
weights and activations, which method may produce it, how it runs on this CPU, and how many bits
a quantized weight really costs once saved.

The presets themselves are compressed-tensors' (`PRESET_SCHEMES`); this table only adds what
quantstudy needs to plan, name, refuse and label them. What each scheme does on a CPU (measured
with torch 2.13 CPU, compressed-tensors 0.19, transformers 5.17 on a tiny Llama, float32 model):

  W4A16, W4A16_ASYM, W8A16  transformers decompresses the weights to float32; exact weight-only.
  W8A8                      weights decompressed; compressed-tensors' forward fake-quantizes every
                            Linear input to int8 per token (dynamic) in float32: the deployed
                            numerics, emulated (no int8 GEMM).
  FP8_DYNAMIC               the same with FP8 E4M3 (float32 emulation; real FP8 GEMMs need CUDA sm89+).
  NVFP4A16, MXFP4A16        save on CPU, but decompress to bf16 weights whatever the model dtype, so a
                            float32 forward fails ("expected m1 and m2 to have the same dtype").
                            `prepare_loaded` casts those weights to the model's dtype (exact: bf16 is
                            a subset of float32): FP4 weights dequantized via bf16, float32 activations.
Schemes that quantize activations to 4 bits (NVFP4, MXFP4) are not offered: they need FP4 hardware
to mean anything, and llm-compressor needs activation calibration for them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any


class Scheme(str, Enum):
    W4A16 = "W4A16"
    W4A16_ASYM = "W4A16_ASYM"
    W8A16 = "W8A16"
    W8A8 = "W8A8"  # int8 weights per channel, int8 dynamic per-token activations
    FP8_DYNAMIC = "FP8_DYNAMIC"
    NVFP4A16 = "NVFP4A16"
    MXFP4A16 = "MXFP4A16"


@dataclass(frozen=True)
class SchemeInfo:
    label: str  # in variant names: rtn-fp8dyn, gptq-w8a8-smooth0.8-c512
    bits: int  # weight bits
    weight_type: str  # int | float
    symmetric: bool
    group_size: int | None  # the layout a fixed-layout scheme imposes (None = per channel)
    group_configurable: bool  # int weight-only schemes take `group_size` from the study (default 128)
    activations: str | None  # what the scheme does to Linear inputs; None = kept 16/32-bit
    cpu_eval: str  # how evaluation runs it on a CPU (shown in the report)
    gpu_note: str = ""  # what a real deployment needs

    @property
    def quantizes_activations(self) -> bool:
        return self.activations is not None


_EXACT = "dequantized weights, float32 activations (exact weight-only numerics)"
TABLE: dict[Scheme, SchemeInfo] = {
    Scheme.W4A16: SchemeInfo("w4a16", 4, "int", True, 128, True, None, _EXACT),
    Scheme.W4A16_ASYM: SchemeInfo("w4a16asym", 4, "int", False, 128, True, None, _EXACT),
    Scheme.W8A16: SchemeInfo("w8a16", 8, "int", True, 128, True, None, _EXACT),
    Scheme.W8A8: SchemeInfo("w8a8", 8, "int", True, None, False, "int8 dynamic per-token",
                            "activations fake-quantized to int8 per token in float32 (emulated: no int8 GEMM)",
                            "int8 GEMM kernels (vLLM CUTLASS/Marlin on GPU)"),
    Scheme.FP8_DYNAMIC: SchemeInfo("fp8dyn", 8, "float", True, None, False, "fp8 e4m3 dynamic per-token",
                                   "FP8 weights dequantized, activations fake-quantized to FP8 per token in float32 "
                                   "(emulated)", "an FP8 GPU (CUDA sm89+: L4, H100) for real FP8 GEMMs"),
    Scheme.NVFP4A16: SchemeInfo("nvfp4a16", 4, "float", True, 16, False, None,
                                "FP4 weights (fp8 scales per 16, global scale) dequantized via bf16, float32 "
                                "activations (emulated)", "Blackwell GPUs for FP4 GEMMs"),
    Scheme.MXFP4A16: SchemeInfo("mxfp4a16", 4, "float", True, 32, False, None,
                                "FP4 weights (power-of-two scales per 32) dequantized via bf16, float32 activations "
                                "(emulated)", "Blackwell GPUs (or MXFP4 kernels) for FP4 GEMMs"),
}
# methods that can produce each kind of scheme (rule written once; config validation and docs use it)
ACTIVATION_METHODS = ("gptq", "rtn")  # AWQ's scale search models weight error only; AutoRound tunes weights
AUTOROUND_SCHEMES = (Scheme.W4A16, Scheme.W4A16_ASYM, Scheme.W8A16)


def info(s: Scheme) -> SchemeInfo:
    return TABLE[s]


def check_entry(i: int, method: str, scheme: Scheme | None, fields_set: set[str], smoothquant: bool,
                fixed_group: Any) -> None:
    """Refuse a quantize entry's impossible combinations at load time, each with its fix."""
    from quantstudy.errors import QuantStudyError

    where = f"quantize[{i}]"
    if smoothquant and (scheme is None or not info(scheme).quantizes_activations):
        raise QuantStudyError("smoothquant only changes results for schemes that quantize activations (it moves "
                              "activation outliers into the weights)", field=f"{where}.smoothquant",
                              value=scheme.value if scheme else "weight-only (bits)",
                              fix="remove `smoothquant:` or use scheme: W8A8")
    if smoothquant and method == "awq":
        raise QuantStudyError("AWQ applies its own smoothing; SmoothQuant in front of it is not a recipe "
                              "llm-compressor supports", field=f"{where}.smoothquant", value=method,
                              fix="use method: gptq or rtn with smoothquant, or drop smoothquant")
    if scheme is None:
        return
    s = info(scheme)
    for key, why in (("bits", f"{scheme.value} fixes {s.bits}-bit weights"),
                     ("symmetric", f"{scheme.value} is {'symmetric' if s.symmetric else 'asymmetric'}")):
        if key in fields_set:
            raise QuantStudyError(f"{why}; `{key}` cannot be set with `scheme`", field=f"{where}.{key}",
                                  value=scheme.value, fix=f"remove `{key}` (or use W4A16_ASYM for asymmetric 4-bit)")
    if "group_size" in fields_set and not s.group_configurable:
        layout = "per-channel" if s.group_size is None else f"groups of {s.group_size}"
        raise QuantStudyError(f"{scheme.value} fixes its weight layout ({layout})", field=f"{where}.group_size",
                              value=fixed_group, fix="remove `group_size` from this entry")
    if s.quantizes_activations and method not in ACTIVATION_METHODS:
        raise QuantStudyError(f"{method} does not support {scheme.value}: its search models weight error only, "
                              "not the activation quantization", field=f"{where}.method", value=method,
                              fix=f"use method {' or '.join(ACTIVATION_METHODS)} (optionally `smoothquant: "
                              "{strength: 0.8}`) for activation-quantized schemes")
    if method == "autoround" and scheme not in AUTOROUND_SCHEMES:
        raise QuantStudyError(f"autoround is wired for integer weight-only schemes, not {scheme.value}",
                              field=f"{where}.scheme", value=scheme.value,
                              fix=f"use {', '.join(x.value for x in AUTOROUND_SCHEMES)} with autoround")


def quantization_scheme(scheme: Scheme | None, bits: int, group_size: int | None, symmetric: bool,
                        actorder: str | None) -> Any:
    """The compressed-tensors QuantizationScheme for Linear layers: a preset (group size set from the
    study where the scheme allows it), or for legacy entries int weights with 16-bit activations."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    if scheme is None:
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                   strategy="channel" if group_size is None else "group", group_size=group_size,
                                   actorder=actorder if group_size else None)
        return QuantizationScheme(targets=["Linear"], weights=weights)
    qs = preset_name_to_scheme(scheme.value, ["Linear"])
    if info(scheme).group_configurable:
        update = {"group_size": group_size, "strategy": "channel" if group_size is None else "group",
                  "actorder": actorder if group_size else None}
        qs = qs.model_copy(update={"weights": QuantizationArgs(**{**qs.weights.model_dump(), **update})})
    return qs


# --------------------------------------------------------------------------- loaded models
def activation_handling(model: Any) -> dict[str, Any]:
    """What the loaded model's Linear layers do to their inputs, read off the modules themselves
    (compressed-tensors' `quantization_scheme`), not from the study file."""
    kinds: dict[str, int] = {}
    for m in model.modules():
        qs = getattr(m, "quantization_scheme", None)
        act = getattr(qs, "input_activations", None) if getattr(m, "quantization_enabled", True) else None
        if act is not None:
            k = f"{act.type.value if hasattr(act.type, 'value') else act.type}{act.num_bits} " \
                f"{'dynamic' if act.dynamic else 'static'} per-{act.strategy.value if hasattr(act.strategy, 'value') else act.strategy}"
            kinds[k] = kinds.get(k, 0) + 1
    return {"quantized_layers": sum(kinds.values()), "kinds": kinds, "activations_quantized": bool(kinds)}


def prepare_loaded(model: Any) -> dict[str, Any]:
    """Make a loaded compressed-tensors model run in its own dtype and say how its activations are
    handled. FP4 checkpoints decompress to bf16 weights in a float32 model (whose forward then fails):
    those weights are cast to the model's dtype, exactly (bf16 values are float32 values)."""
    import torch

    from compressed_tensors.offload import disable_onloading

    dtype = model.get_input_embeddings().weight.dtype  # the dtype the model was loaded in
    cast = 0
    # compressed-tensors holds a loaded model's parameters in an offload cache whose assignment copies
    # into the existing tensor (keeping bf16); with onloading disabled the new tensor replaces it
    with disable_onloading():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if (getattr(m, "quantization_scheme", None) is not None and isinstance(w, torch.nn.Parameter)
                    and w.is_floating_point() and w.dtype != dtype):
                m.weight = torch.nn.Parameter(w.data.to(dtype), requires_grad=False)
                cast += 1
    out = activation_handling(model)
    out["weights_cast_to_model_dtype"] = cast
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


# --------------------------------------------------------------------------- bits per weight
def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def bits_per_weight(model_dir: Path) -> dict[str, float]:
    """Real storage cost of the quantized Linear weights of a saved compressed-tensors model, from
    the safetensors headers: every tensor of a quantized module (packed weights, scales, zero points,
    global scales; not the 2-int `weight_shape` layout record) in bits, per logical weight. Logical
    weights = bytes of `weight`/`weight_packed` x 8 / the scheme's weight bits."""
    cfg = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    groups = list((cfg.get("config_groups") or {}).values())
    if not groups or not groups[0].get("weights"):
        return {}
    wbits = int(groups[0]["weights"]["num_bits"])
    mods: dict[str, dict[str, int]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for name, t in _header(f).items():
            if name == "__metadata__":
                continue
            mod, _, leaf = name.rpartition(".")
            nbytes = t["data_offsets"][1] - t["data_offsets"][0]
            mods.setdefault(mod, {})[leaf] = nbytes
    quant = {m: d for m, d in mods.items() if "weight_scale" in d}
    if not quant:
        return {}
    weights = sum((d.get("weight_packed") or d.get("weight", 0)) * 8 / wbits for d in quant.values())
    total = sum(b for d in quant.values() for leaf, b in d.items() if leaf != "weight_shape")
    payload = sum((d.get("weight_packed") or d.get("weight", 0)) for d in quant.values())
    return {"bits_per_weight": 8 * total / weights, "payload_bits": 8 * payload / weights,
            "quantized_weights": weights, "quantized_layers": float(len(quant))}
