"""What produced the numbers: library versions and hardware, recorded in the store's meta."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("quantstudy", "torch", "transformers", "llmcompressor", "compressed-tensors", "lm_eval", "trl",
            "peft", "datasets", "accelerate", "vllm")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


def hardware() -> dict[str, Any]:
    import psutil
    import torch

    hw: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                          "cpu_count": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
                          "cuda": torch.cuda.is_available()}
    if hw["cuda"]:
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return hw


def resolve_device(requested: str) -> str:
    import torch

    from quantstudy.errors import QuantStudyError

    if requested == "cuda" and not torch.cuda.is_available():
        raise QuantStudyError("a CUDA device was requested but torch sees none", field="device", value="cuda",
                              fix="set `device: cpu` (or `auto`), or run on a machine with a CUDA GPU and a CUDA torch")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def record(ctx: Any) -> None:
    """Store the versions, hardware and config of this run (the report's technical details)."""
    from quantstudy.config import dump_config

    store = ctx.store
    store.set_meta("config", json.dumps(dump_config(ctx.cfg)))
    store.set_meta("versions", json.dumps(versions()))
    store.set_meta("hardware", json.dumps(hardware()))
    store.set_meta("device", ctx.device)
    store.set_meta("data", ctx.data_id)
    store.set_meta("argv", json.dumps(sys.argv))
