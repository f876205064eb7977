"""Fidelity: how far a variant's next-token distribution moved from its own baseline's.

Token level (like llama.cpp's --kl-divergence mode and "Accuracy is not all you need",
Dutta et al. 2024): on a fixed text (WikiText-2 test by default), scored in windows of up
to `context_length` tokens that each score `stride` new tokens (every token once, as in
lm-eval's rolling loglikelihood / HF's perplexity recipe), per token we compute
  KL(baseline || variant), top-1 agreement (same argmax), log p of the correct next token
  under both (-> perplexity of each and their ratio) and the change in its probability
  (-> RMS Δp).

The baseline is run once per (baseline weights, text, window settings, top_k, dtype, device):
its top-k log-probabilities per position (int32 indices: vocabularies exceed 65535;
float32 values: a good 8-bit variant's KL is ~1e-4..1e-3 nats, the size of float16's
rounding of a log-prob, while float32 costs tokens*k*8 bytes, 34 MB at the defaults),
the log of its tail mass (log of 1 - sum of top-k probs, computed as a logsumexp over the
tail, so it does not cancel to 0) and the log p of the correct token are saved to
`<work_dir>/fidelity/<key>.npz`. Each variant then needs one forward pass.

KL approximation (a lower bound on the full-vocabulary KL): see scoring/divergence.py.

Answer level (which multiple-choice answers changed): computed by the report from the stored
evaluation items (report/answers.py), so evaluation settings do not re-key this stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from quantstudy.config import FidelityConfig, StudyConfig
from quantstudy.records import Metric, Metrics, Record
from quantstudy.stages.protocol import Job, StageName
from quantstudy.errors import QuantStudyError
from quantstudy.scoring.divergence import kl_topk_tail, topk_tail, window_logprobs, windows
from quantstudy.store import ModelRecord

CACHE_VERSION = 2  # 2: log-probs computed in position chunks (window_logprobs)
APPROX_NOTE = ("KL over the baseline's top-k tokens plus one tail bucket: a lower bound on the "
               "full-vocabulary KL (log-sum inequality); exact when top_k = vocab size")


# --------------------------------------------------------------------------- text and windows
def load_text(source: str, data_dir: Path | None, config_dir: Path | None = None) -> tuple[str, str]:
    """(text, description). `wikitext` = WikiText-2 raw test from data_dir, else the hub.

    A relative file path is looked up in config_dir (the study file's folder), then data_dir."""
    if source == "wikitext":
        raw = data_dir / "wikitext-2-raw" / "wiki.test.raw" if data_dir else None
        if raw is not None and raw.is_file():
            return raw.read_text(encoding="utf-8"), f"wikitext-2-raw test ({raw})"
        try:
            from datasets import load_dataset

            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        except Exception as e:  # noqa: BLE001 - any hub/network failure is the same fix for the user
            raise QuantStudyError(f"WikiText-2 is not in the data dir and the hub failed ({e.__class__.__name__})",
                                  field="fidelity.source", value=source,
                                  fix="set data_dir to a folder with wikitext-2-raw/wiki.test.raw, or give a text "
                                      "file path") from None
        return "".join(ds["text"]), "wikitext-2-raw-v1 test (hub)"  # rows keep their "\n": = the raw file
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = next((d / path for d in (config_dir, data_dir) if d is not None and (d / path).is_file()),
                    (config_dir or Path.cwd()) / path)
    if not path.is_file():
        raise QuantStudyError("fidelity text file not found", field="fidelity.source", value=source,
                              fix="use `wikitext` or the path of a UTF-8 text file (absolute, or relative to the "
                                  "study file's folder or data_dir)")
    text = path.read_text(encoding="utf-8", errors="replace")
    return text, f"{path} (sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]})"


def tokenize(tok: Any, text: str, n_tokens: int) -> np.ndarray:
    """The first n_tokens token ids of text (int64). Tokenizes a growing prefix, not 1.3 MB."""
    chars = n_tokens * 8
    while True:
        ids = tok(text[:chars], add_special_tokens=True)["input_ids"]
        # BPE pre-tokenization is local, so a cut far past token n_tokens cannot change them
        if len(ids) > n_tokens + 64 or chars >= len(text):
            return np.asarray(ids[:n_tokens], dtype=np.int64)
        chars *= 2


# --------------------------------------------------------------------------- baseline cache
def _progress(ctx: Job, label: str, total: int):
    import contextlib

    task = ctx.progress.add_task(label, total=total)  # the driver's view (rich bars or timed plain lines)
    return contextlib.nullcontext(), lambda: ctx.progress.advance(task)


def _load(path: str, ctx: Job) -> tuple[Any, Any]:
    from quantstudy.runtime.modeldir import load_pretrained

    from quantstudy.config.schemes import prepare_loaded

    model, tok = load_pretrained(Path(path), device=ctx.device, dtype=ctx.cfg.model.dtype.value,
                                 trust_remote_code=ctx.cfg.model.trust_remote_code)
    prepare_loaded(model)  # FP4 checkpoints: weights in the model's dtype (schemes.py)
    return model, tok


def cache_key(ctx: Job, baseline: ModelRecord, ids: np.ndarray, fcfg: FidelityConfig) -> str:
    spec = {"v": CACHE_VERSION, "baseline": baseline.weights_hash or str(Path(baseline.path).resolve()),
            "ids": hashlib.sha256(ids.tobytes()).hexdigest(), "context_length": fcfg.context_length,
            "stride": fcfg.stride or fcfg.context_length, "top_k": fcfg.top_k,
            "dtype": ctx.cfg.model.dtype.value, "device": ctx.device}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def baseline_cache(ctx: Job, baseline: ModelRecord, ids: np.ndarray, fcfg: FidelityConfig) -> dict[str, np.ndarray]:
    """The baseline's top-k log-probs per scored token; computed once, then read from disk."""
    path = ctx.work_dir / "fidelity" / f"{cache_key(ctx, baseline, ids, fcfg)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # unreadable (truncated copy, disk error): it is a cache, so recompute and overwrite
    model, _ = _load(baseline.path, ctx)
    wins = windows(len(ids), fcfg.context_length, fcfg.stride or fcfg.context_length)
    parts: dict[str, list[np.ndarray]] = {"idx": [], "logp_k": [], "logp_tail": [], "logp_gold": []}
    prog, step = _progress(ctx, f"fidelity: baseline {baseline.name}", len(wins))
    with prog:
        for first, end, logp in window_logprobs(model, ids, wins, ctx.device, step):
            idx, vals, tail = topk_tail(logp, fcfg.top_k)
            gold = torch.as_tensor(ids[first:end], device=logp.device)[:, None]
            for name, t in (("idx", idx.int()), ("logp_k", vals), ("logp_tail", tail),
                            ("logp_gold", logp.gather(-1, gold)[:, 0])):
                parts[name].append(t.cpu().numpy())
            vocab = logp.shape[-1]
    del model
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["vocab"] = np.asarray(vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # write, then rename into place
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **out)
    os.replace(tmp, path)
    return out


# --------------------------------------------------------------------------- token-level metrics
def variant_pass(ctx: Job, model: Any, ids: np.ndarray, base: dict[str, np.ndarray], fcfg: FidelityConfig,
                 label: str) -> dict[str, np.ndarray]:
    """Per scored token: kl (top-k bound), agree (bool), logp/logq of the correct token."""
    wins = windows(len(ids), fcfg.context_length, fcfg.stride or fcfg.context_length)
    kl, agree, logq_gold, at = [], [], [], 0
    prog, step = _progress(ctx, f"fidelity: {label}", len(wins))
    with prog:
        for first, end, logq in window_logprobs(model, ids, wins, ctx.device, step):
            if logq.shape[-1] != int(base["vocab"]):
                raise QuantStudyError(f"{label} has a different vocabulary size than its baseline",
                                      value=[logq.shape[-1], int(base["vocab"])],
                                      fix="compare a variant only with the model it was quantized from")
            sl = slice(at, at + end - first)
            at = sl.stop
            idx = torch.as_tensor(base["idx"][sl], device=logq.device).long()
            kl.append(kl_topk_tail(idx, torch.as_tensor(base["logp_k"][sl], device=logq.device),
                                   torch.as_tensor(base["logp_tail"][sl], device=logq.device), logq))
            agree.append((logq.argmax(-1) == idx[:, 0]).cpu().numpy())
            gold = torch.as_tensor(ids[first:end], device=logq.device)[:, None]
            logq_gold.append(logq.gather(-1, gold)[:, 0].cpu().numpy())
    return {"kl": np.concatenate(kl), "agree": np.concatenate(agree),
            "logp": base["logp_gold"].astype(np.float64), "logq": np.concatenate(logq_gold).astype(np.float64)}


def summarize(tok: dict[str, np.ndarray]) -> dict[str, float]:
    kl, lp, lq = tok["kl"], tok["logp"], tok["logq"]
    ppl, ppl_b = float(np.exp(-lq.mean())), float(np.exp(-lp.mean()))
    return {"kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)), "kl_p99": float(np.percentile(kl, 99)),
            "top1_agree": float(tok["agree"].mean()), "ppl": ppl, "ppl_baseline": ppl_b, "ppl_ratio": ppl / ppl_b,
            "dp_rms": float(np.sqrt(np.mean((np.exp(lq) - np.exp(lp)) ** 2))), "n_tokens": float(len(kl))}


# --------------------------------------------------------------------------- stage entry point
def fidelity_model(ctx: Job) -> Iterator[Record]:
    """fidelity.* metrics of `ctx.model` against its parent `ctx.parent` (see the module docstring)."""
    from transformers import AutoConfig, AutoTokenizer

    variant, baseline = ctx.model, ctx.parent
    fcfg = ctx.cfg.fidelity or FidelityConfig()
    trc = ctx.cfg.model.trust_remote_code
    max_pos = getattr(AutoConfig.from_pretrained(baseline.path, trust_remote_code=trc), "max_position_embeddings", None)
    if max_pos is not None and fcfg.context_length > max_pos:
        raise QuantStudyError(f"fidelity windows are longer than {baseline.name} supports", value=fcfg.context_length,
                              field="fidelity.context_length", fix=f"set fidelity.context_length <= {max_pos}")
    text, source = load_text(fcfg.source, ctx.data_dir, ctx.config_dir)
    btok = AutoTokenizer.from_pretrained(baseline.path, trust_remote_code=trc)
    ids = tokenize(btok, text, fcfg.tokens)
    if len(ids) < 2:
        raise QuantStudyError("the fidelity text has fewer than 2 tokens", field="fidelity.source", value=fcfg.source,
                              fix="use a longer text file, or `wikitext`")
    base = baseline_cache(ctx, baseline, ids, fcfg)
    model, vtok = _load(variant.path, ctx)
    if not np.array_equal(tokenize(vtok, text, fcfg.tokens), ids):
        raise QuantStudyError(f"variant {variant.name} tokenizes the text differently from {baseline.name}",
                              fix="compare a variant only with the model it was derived from (same tokenizer)")
    from quantstudy.config.schemes import activation_handling

    handling = activation_handling(model)  # read off the loaded modules (#22)
    found = [Metric("activations.fidelity", float(handling["quantized_layers"] > 0), handling)]
    tok = variant_pass(ctx, model, ids, base, fcfg, variant.name)
    info = {"baseline": baseline.name, "source": source, "top_k": fcfg.top_k, "context_length": fcfg.context_length,
            "stride": fcfg.stride or fcfg.context_length, "tokens_requested": fcfg.tokens, "approximation": APPROX_NOTE}
    yield Metrics(variant.name, found + [Metric(f"fidelity.{name}", value, info)
                                         for name, value in summarize(tok).items()])


class Stage:
    """Fidelity: the key hashes the fidelity settings only; which answers changed is the report's
    reading of the evaluation items, so evaluation settings do not re-run this stage."""

    name = StageName.fidelity

    def key_inputs(self, cfg: StudyConfig) -> tuple[object, ...]:
        return (cfg.fidelity,)

    def run(self, job: Job) -> Iterator[Record]:
        return fidelity_model(job)
