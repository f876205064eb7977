"""A safetensors checkpoint read tensor by tensor with plain file reads (no memory map).

Written by hand (the format is an 8-byte header length, a JSON header of name -> dtype, shape,
byte range, then the data) because safetensors' own reader memory-maps the file, and every page
it touches counts in this process's RSS high-water mark: the peak memory the packed backend's
speed measurement reports (scoring/packed.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from quantstudy.errors import QuantStudyError

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_CHUNK = 16 << 20  # bytes read at a time when converting a large float tensor


class Tensors:
    """The checkpoint's tensors by name, each read on demand. Large float tensors are converted to
    the target dtype chunk by chunk, so a float32 embedding never exists whole beside its bf16 copy."""

    def __init__(self, path: Path) -> None:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise QuantStudyError("the packed backend reads safetensors and this model has none", field="model path",
                                  value=str(path), fix="re-save the model with save_pretrained(save_compressed=True) "
                                  "or set evaluate.speed.backend: dense")
        self.index: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        for f in files:
            with open(f, "rb") as h:
                n = struct.unpack("<Q", h.read(8))[0]
                header = json.loads(h.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    b, e = v["data_offsets"]
                    self.index[k] = (f, _ST_DTYPES[v["dtype"]], v["shape"], 8 + n + b, 8 + n + e)

    def keys(self) -> list[str]:
        return list(self.index)

    def pop(self, key: str, default: Any = ..., to: torch.dtype | None = None) -> torch.Tensor:
        if key not in self.index and default is not ...:
            return default
        f, dtype, shape, b, e = self.index.pop(key)
        out_dtype = to if to is not None and dtype.is_floating_point else dtype
        out = torch.empty(shape, dtype=out_dtype)
        with open(f, "rb", buffering=0) as h:
            h.seek(b)
            if out_dtype == dtype or not shape or not shape[0]:
                _read_exact(h, out.view(-1).view(torch.uint8).numpy(), f, key)
                return out
            row_bytes = (e - b) // shape[0]
            rows = max(1, _CHUNK // max(1, row_bytes))
            for i in range(0, shape[0], rows):
                j = min(shape[0], i + rows)
                buf = torch.empty((j - i) * row_bytes, dtype=torch.uint8)
                _read_exact(h, buf.numpy(), f, key)
                out[i:j] = buf.view(dtype).reshape(j - i, *shape[1:])
        return out


def _read_exact(h: Any, buf: Any, f: Path, key: str) -> None:
    """readinto may return fewer bytes (a truncated file ends early): that is a damaged file, not zeros."""
    got = h.readinto(buf)
    if got != buf.nbytes:
        from quantstudy.runtime.modeldir import DAMAGED_FIX

        raise QuantStudyError(f"safetensors file is truncated: tensor {key} has {got} of {buf.nbytes} bytes",
                              field="model path", value=str(f), fix=DAMAGED_FIX)
