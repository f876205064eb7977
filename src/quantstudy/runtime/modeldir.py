"""A model directory: its weight files, their size and hash, its sanity checks, and loading it.

Every stage works on plain Hugging Face directories (config + safetensors + tokenizer); this is the
one place that reads them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

from quantstudy.errors import QuantStudyError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def weights_size(model_dir: Path) -> int:
    """Bytes of weight files on disk (what a deployment ships), excluding tokenizer/config."""
    return sum(p.stat().st_size for p in weight_files(model_dir))


def weights_hash(model_dir: Path) -> str:
    h = hashlib.sha256()
    for p in weight_files(model_dir):
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def check_model_dir(model_dir: Path, field: str = "model.source") -> None:
    if not model_dir.is_dir():
        raise QuantStudyError("model directory does not exist", field=field, value=str(model_dir),
                              fix="point it at a folder with config.json and *.safetensors")
    if not (model_dir / "config.json").is_file():
        raise QuantStudyError("model directory has no config.json", field=field, value=str(model_dir),
                              fix="save the model with save_pretrained(), or name a hub id instead")
    if not weight_files(model_dir):
        raise QuantStudyError("model directory has no weight files (*.safetensors / *.bin)", field=field,
                              value=str(model_dir), fix="copy the weights into it or re-save with save_pretrained()")
    check_model_files(model_dir, field)


DAMAGED_FIX = ("if the folder is one this study made (under its models/), delete it and run again: the model is "
               "re-made; otherwise copy or save the model again")


def check_model_files(model_dir: Path, field: str) -> None:
    """A damaged config.json or safetensors file (truncated copy, disk error) is one clear error before
    any stage uses it, not a library traceback mid-run. Reads only config.json and each file's header."""
    import json

    from safetensors import SafetensorError, safe_open

    cfg = model_dir / "config.json"
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise QuantStudyError(f"{cfg} is not valid JSON ({e})", field=field, value=str(model_dir),
                              fix=DAMAGED_FIX) from None
    for f in weight_files(model_dir):
        if f.suffix != ".safetensors":
            continue
        try:
            # safetensors checks the header and that the file holds every tensor it declares (no data read)
            with safe_open(str(f), framework="np"):
                pass
        except (SafetensorError, OSError) as e:
            raise QuantStudyError(f"{f} is damaged or truncated ({e})", field=field, value=str(model_dir),
                                  fix=DAMAGED_FIX) from None


def quantization_config(model_dir: Path) -> dict[str, Any]:
    """config.json's quantization_config ({} for a model that is not quantized or has no config.json)."""
    import json

    f = Path(model_dir) / "config.json"
    return (json.loads(f.read_text()).get("quantization_config") or {}) if f.is_file() else {}


def is_compressed(model_dir: Path) -> bool:
    """True for a compressed-tensors checkpoint (what llm-compressor writes)."""
    return quantization_config(model_dir).get("quant_method") == "compressed-tensors"


def load_pretrained(path: Path, device: str = "cpu", dtype: str = "float32",
                    trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load an HF dir (also a compressed-tensors dir: transformers decompresses it to dense)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(Path(path), field="model path")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {}
    if is_compressed(Path(path)):
        from transformers import CompressedTensorsConfig

        # Decompress to dense Linear at load time (not lazily at the first forward, which
        # would land in the first timed request). Transformers has no packed 4-bit CPU
        # kernel: accuracy is the quantized model's, speed and memory are not.
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 trust_remote_code=trust_remote_code, **kwargs)
    model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


# --------------------------------------------------------------------------- making a model directory
def attempt_dir(out_dir: Path) -> Path:
    """A temporary folder of its own for one attempt at making `out_dir`: a retried attempt and a
    zombie one (a worker Ray gave up on that still runs) never write into the same folder."""
    return out_dir.with_name(f"{out_dir.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def publish(tmp: Path, out_dir: Path) -> None:
    """Rename a finished attempt into place. A model already there is moved aside first and deleted
    after, so a reader finds a complete model (the old or the new one), never a half-written folder.
    Then the folders of attempts that died on this host are removed."""
    for _ in range(5):  # another attempt may publish at the same moment: retry the swap
        old = out_dir.with_name(f"{out_dir.name}.{uuid.uuid4().hex[:8]}.old")
        try:
            os.replace(out_dir, old)
        except FileNotFoundError:
            old = None
        try:
            os.replace(tmp, out_dir)
            break
        except OSError:  # out_dir reappeared (a concurrent publish): swap again
            continue
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    host = socket.gethostname()
    for stale in out_dir.parent.glob(f"{out_dir.name}.{host}-*.tmp"):
        pid = stale.name[len(f"{out_dir.name}.{host}-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def decoder_layers(model_dir: Path) -> int:
    """Decoder layers of a model directory (its config.json; a multimodal config nests them)."""
    import json

    cfg = json.loads((model_dir / "config.json").read_text())
    return int(cfg.get("text_config", cfg).get("num_hidden_layers", 0))
