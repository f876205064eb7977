"""Run a compressed-tensors W4A16 model on torch's packed int4 kernels (CPU and CUDA).

transformers decompresses a `pack-quantized` checkpoint to dense Linear layers, so its speed and
memory are not a 4-bit deployment's. torch ships weight-only int4 matmuls that keep the weights
packed: `_weight_int4pack_mm_for_cpu` (AVX2/AVX-512, bf16 activations; with float32 activations
it falls back to a scalar loop) and `_weight_int4pack_mm` (CUDA sm80+, "tinygemm"). No library
maps compressed-tensors' layout onto theirs, so it is written here, checked against
compressed-tensors' own decompression in tests/test_packed.py:

  compressed-tensors: weight_packed int32 [N, K/8], value q in [-8, 7] stored as q + 8, low nibble
    first; weight_scale [N, G]; asymmetric: weight_zero_point int32 [N/8, G] (packed along N);
    w = (q - zp) * scale.
  torch kernels: u = q + 8 in [0, 15]; scales-and-zeros [G, N, 2] in the activation dtype; the
    kernel computes (u - 8) * scale + zero, so zero = 0 (symmetric) or -zp * scale (asymmetric).
    CPU packer: int32 [N, K] (one value per element); CUDA packer: uint8 [N, K/2], even column in
    the high nibble, plus innerKTiles.

The model is built on the meta device (accelerate.init_empty_weights) and filled from the
safetensors files (read without a memory map: tensorfile.py), so a dense copy of a quantized weight never exists. The packed layout depends
on the instruction set, so it is built at every load and never saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantstudy.errors import QuantStudyError
from quantstudy.runtime.modeldir import check_model_dir, quantization_config
from quantstudy.scoring.tensorfile import Tensors

GROUP_SIZES = (256, 128, 64, 32)  # the only group sizes both kernels accept
ACT_DTYPE = torch.bfloat16  # scales must be in the activation dtype; float32 activations hit the scalar path


class PackedBackend(str, Enum):
    cpu = "torch-int4pack-cpu"
    cuda = "torch-int4pack-cuda"


@dataclass
class PackReport:
    backend: PackedBackend
    packed: list[str] = field(default_factory=list)  # module names on the int4 kernel
    dense: dict[str, str] = field(default_factory=dict)  # quantized module -> why it stays dense (decompressed)
    resident_bytes: int = 0  # bytes of parameters + buffers after loading (packed weights, scales, dense rest)


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W held as packed int4 + per-group bf16 scales and zeros."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, in_features: int,
                 out_features: int, bias: torch.Tensor | None, backend: PackedBackend) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group, self.backend = in_features, out_features, group, backend
        self.register_buffer("packed_weight", packed)  # CPU: uint8 [N, K/2]; CUDA: int32 tiles
        self.register_buffer("scales_zeros", scales_zeros)  # [G, N, 2], bf16
        self.register_buffer("bias", bias)
        self._mm = (torch.ops.aten._weight_int4pack_mm_for_cpu if backend == PackedBackend.cpu
                    else torch.ops.aten._weight_int4pack_mm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._mm(x.reshape(-1, self.in_features).to(ACT_DTYPE).contiguous(), self.packed_weight, self.group,
                     self.scales_zeros)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group}, {self.backend.value}"


def int4_values(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """compressed-tensors' own unpacking: int8 q in [-8, 7], [N, K]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, 4, torch.Size(shape))


def zero_points(packed_zp: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """Asymmetric zero points, packed along N by compressed-tensors -> int8 [N, G]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed_zp, 4, torch.Size((n, groups)), packed_dim=0)


def kernel_group(k: int, groups: int) -> int | None:
    """The kernel group size for a layer with `groups` scale columns, or None when none fits.

    Per-channel layers (one group spanning K) repeat their scale over the largest kernel group
    that divides K: the same numbers, in a shape the kernel takes."""
    if groups > 1:
        return k // groups if k % groups == 0 and k // groups in GROUP_SIZES else None
    return next((g for g in GROUP_SIZES if k % g == 0), None)


def why_dense(n: int, k: int, groups: int, bits: int, backend: PackedBackend) -> str | None:
    """None when the kernel takes this layer, else the reason it stays dense."""
    if bits != 4:
        return f"{bits}-bit weights (the kernels are 4-bit only)"
    if kernel_group(k, groups) is None:
        return f"group size {k // groups if groups else k} (kernels take {'/'.join(map(str, GROUP_SIZES[::-1]))})"
    if n % (16 if backend == PackedBackend.cpu else 8):  # CPU packer: N % 16; CUDA tiles: N % 8
        return f"{n} output features (not a multiple of {16 if backend == PackedBackend.cpu else 8})"
    if backend == PackedBackend.cuda and k % 32:
        return f"{k} input features (CUDA tiles need a multiple of 32)"
    return None


def scales_and_zeros(scale: torch.Tensor, zp: torch.Tensor | None, reps: int) -> torch.Tensor:
    """[N, G] float scale (+ int zero points) -> the kernels' [G*reps, N, 2] in the activation dtype."""
    s = scale.to(ACT_DTYPE).repeat_interleave(reps, dim=1)  # [N, G']
    z = torch.zeros_like(s) if zp is None else (-zp.float().repeat_interleave(reps, dim=1) * s.float()).to(ACT_DTYPE)
    return torch.stack([s, z], dim=-1).transpose(0, 1).contiguous()


def pack_cuda_input(u: torch.Tensor) -> torch.Tensor:
    """uint values [N, K] in [0, 15] -> the CUDA packer's uint8 [N, K/2]: even column high nibble."""
    return ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8)


def inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def pack_layer(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, bias: torch.Tensor | None,
               backend: PackedBackend, device: str) -> PackedLinear:
    """q int8 [N, K] in [-8, 7]; scale [N, G]; zp int8 [N, G] or None (symmetric)."""
    n, k = q.shape
    group = kernel_group(k, scale.shape[1])
    assert group is not None, "why_dense() is checked first"
    u = (q.to(torch.int32) + 8).contiguous()  # [N, K] in [0, 15]
    sz = scales_and_zeros(scale, zp, (k // group) // scale.shape[1]).to(device)
    if backend == PackedBackend.cpu:
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)  # innerKTiles is unused on CPU
    else:
        w = torch.ops.aten._convert_weight_to_int4pack(pack_cuda_input(u).to(device), inner_k_tiles(k))
    return PackedLinear(w, sz, group, k, n, None if bias is None else bias.to(device, ACT_DTYPE), backend)


def _scheme_for(name: str, module: nn.Module, qcfg: Any) -> Any:
    from compressed_tensors.utils import is_match

    for scheme in qcfg.config_groups.values():
        if is_match(name, module, scheme.targets):
            return scheme
    return None


def is_pack_quantized(q: dict[str, Any]) -> bool:
    """A compressed-tensors `pack-quantized` checkpoint: what load_packed reads."""
    return q.get("quant_method") == "compressed-tensors" and q.get("format") == "pack-quantized"


def is_w4a16(path: Path) -> bool:
    """What the packed backend runs on int4 kernels: a pack-quantized checkpoint whose weights are all
    4-bit and whose activations are not quantized."""
    q = quantization_config(path)
    groups = list((q.get("config_groups") or {}).values())
    return is_pack_quantized(q) and bool(groups) and all(
        (g.get("weights") or {}).get("num_bits") == 4 and not g.get("input_activations") for g in groups)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers a loaded model holds (a tied tensor counted once)."""
    return sum(t.numel() * t.element_size() for t in
               {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values())


def load_packed(path: Path, device: str = "cpu", trust_remote_code: bool = False) -> tuple[Any, Any, PackReport]:
    """Load a compressed-tensors W4A16 pack-quantized model dir with its 4-bit Linear layers packed.

    Everything else (embeddings, norms, lm_head, layers the kernels cannot take) is dense in bf16,
    the kernels' activation dtype."""
    from accelerate import init_empty_weights
    from compressed_tensors import QuantizationConfig
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    check_model_dir(path, field="model path")  # a damaged config or safetensors file: one clear error
    raw = quantization_config(path)
    if not is_pack_quantized(raw):
        raise QuantStudyError("the packed backend runs compressed-tensors `pack-quantized` (W4A16) models only",
                              field="evaluate.speed.backend", value=f"{raw.get('quant_method')}/{raw.get('format')}",
                              fix="set evaluate.speed.backend: dense for this model")
    backend = PackedBackend.cuda if device == "cuda" else PackedBackend.cpu
    qcfg = QuantizationConfig.model_validate(raw)
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # we load the weights ourselves; transformers must not decompress
    with init_empty_weights():  # parameters on meta; buffers (rotary inv_freq) real
        model = AutoModelForCausalLM.from_config(cfg, dtype=ACT_DTYPE, trust_remote_code=trust_remote_code)
    tensors = Tensors(path)
    report = PackReport(backend)
    dense: dict[str, torch.Tensor] = {}
    for prefix in sorted({k.removesuffix(".weight_packed") for k in tensors.keys() if k.endswith(".weight_packed")}):
        parts = {k.removeprefix(prefix + "."): tensors.pop(k) for k in tensors.keys() if k.startswith(prefix + ".weight_")}
        bias = tensors.pop(prefix + ".bias", None)
        module = model.get_submodule(prefix)
        scheme = _scheme_for(prefix, module, qcfg)
        if scheme is None or scheme.weights is None:
            raise QuantStudyError("a packed weight matches no quantization config group", field="model path",
                                  value=prefix, fix="check config.json's quantization_config.config_groups")
        n, k = (int(v) for v in parts["weight_shape"])
        args = scheme.weights
        reason = why_dense(n, k, parts["weight_scale"].shape[1], args.num_bits, backend)
        g_idx = parts.get("weight_g_idx")
        if reason is None and g_idx is not None and not torch.equal(
                g_idx.long(), torch.arange(k) // (k // parts["weight_scale"].shape[1])):
            reason = "GPTQ act-order group index (columns not in group order)"
        if reason is None:
            zp = None if args.symmetric else zero_points(parts["weight_zero_point"], n, parts["weight_scale"].shape[1])
            packed = pack_layer(int4_values(parts["weight_packed"], (n, k)), parts["weight_scale"], zp, bias,
                                backend, device)
            parent, _, child = prefix.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, packed)
            report.packed.append(prefix)
            continue
        report.dense[prefix] = reason
        # compressed-tensors' own decompression (the same the evaluation uses), then bf16
        w = PackedQuantizationCompressor.decompress(dict(parts), scheme)["weight"]
        dense[prefix + ".weight"] = w.to(ACT_DTYPE)
        if bias is not None:
            dense[prefix + ".bias"] = bias
    for k in tensors.keys():  # the rest (embeddings, norms, unquantized layers): bf16 as each is read
        dense[k] = tensors.pop(k, to=ACT_DTYPE).to(device)
    missing = {k for k, _ in model.named_parameters()} - set(dense)
    model.load_state_dict({k: v.to(device, ACT_DTYPE) if v.is_floating_point() else v.to(device)
                           for k, v in dense.items()}, strict=False, assign=True)
    del dense
    model.tie_weights()  # a tied lm_head shares the embedding just assigned
    still_meta = [k for k, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise QuantStudyError(f"{len(still_meta)} tensors are missing from the checkpoint", field="model path",
                              value=still_meta[:5], fix=f"the files in {path} do not match its config.json "
                              f"(missing {sorted(missing)[:5]}); re-save the model")
    model.to(device).eval()
    report.resident_bytes = resident_bytes(model)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, report
