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

KL approximation (a lower bound). With S = the baseline's top-k tokens and T = the rest,
  KL_k = sum_{i in S} p_i log(p_i/q_i) + p_T log(p_T/q_T),  p_T = 1 - sum_S p, q_T = 1 - sum_S q
is the exact KL between the two distributions coarsened to k+1 outcomes (the tail merged
into one bucket). By the log-sum inequality, sum_{i in T} p_i log(p_i/q_i) >= p_T log(p_T/q_T),
so KL_k <= KL_full (data-processing inequality), with equality when k = vocab size or when
q is proportional to p on the tail. Measured gap (benchmarks/fidelity_topk.py, SmolLM2-135M,
WikiText-2, 8191 tokens, 512-token windows; share by which the mean KL reads low / p99 low):
  k=16: 29-40% / 10-25%   k=64: 17-24% / 6-15%   k=256 (default): 9-13% / 4-7%
  k=1024: 5% / 2-3.5%     k=4096: 1.4% / 0.7-1.2%        (vocab 49152; RTN W4/W8, GPTQ W4)
The relative gap is similar across variants, so rankings hold; absolute KL reads low.

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
from quantstudy.store import ModelRecord

CACHE_VERSION = 2  # 2: log-probs computed in position chunks (window_logprobs)
# floats per vocabulary-sized buffer: 2**24 = 64 MB, 110 positions at Qwen3's 151,936 tokens, 341 at
# SmolLM2's 49,152. A whole 512-token window is 311 MB per buffer at 151,936, and the KL arithmetic
# holds ~4 such buffers at once (logits, log-softmax, the top-k tail's masked copy, its logsumexp).
# Peak RSS growth of one fidelity run at vocab 151,936 (tests/test_qwen3.py): whole windows 1220 MiB,
# 64 MB chunks 283 MiB, but 16 MB chunks 1432 MiB: glibc serves blocks under its 32 MB mmap ceiling
# from the heap, where freed chunks of varying size fragment it; larger blocks go back to the OS.
HEAD_FLOATS = 1 << 24
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


def windows(n: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first, stop) per window: input ids[begin:stop-1] scores targets ids[first:stop].

    As lm-eval's rolling windows: every token 1..n-1 is scored exactly once, `stride` new
    targets per window, each with up to `context_length` tokens of context (the input window).
    Token 0 has no context and is not scored (no BOS is added; none is for SmolLM2).
    """
    out = []
    for first in range(1, n, stride):
        stop = min(first + stride, n)
        out.append((max(0, stop - 1 - context_length), first, stop))
    return out


def window_logprobs(model: Any, ids: np.ndarray, wins: list[tuple[int, int, int]], device: str, progress: Any = None):
    """Yield (first, stop, logp): log_softmax over the vocab (float32, [stop - first, vocab]) of the
    targets ids[first:stop], window by window in chunks of positions.

    Every vocabulary-sized buffer (logits, log-probs, the top-k tail's masked copy) holds at most
    HEAD_FLOATS floats: a whole 512-token window at Qwen3's 151,936-token vocabulary is 311 MB per
    buffer, several at once. When the model's logits are its head applied to its decoder's output
    (checked once, as the fast scorer does) only the decoder runs on the whole window and the head
    runs per chunk; otherwise (logit scaling, soft-capping) the full logits are computed and only
    the log-softmax and what follows are chunked.
    """
    from quantstudy.scoring.fastscore import head_is_separable

    separable = len(ids) > 0 and head_is_separable(model, int(ids[0]), device)
    with torch.inference_mode():
        for begin, first, stop in wins:
            x = torch.as_tensor(ids[begin:stop - 1], device=device)[None]
            if separable:  # [targets, d_model]; position j predicts j + 1
                hidden = model.get_decoder()(input_ids=x, use_cache=False).last_hidden_state[0, first - 1 - begin:]
                head = model.get_output_embeddings()
            else:
                hidden = model(input_ids=x, use_cache=False).logits[0, first - 1 - begin:]
                head = None
            vocab = model.get_output_embeddings().weight.shape[0] if separable else hidden.shape[-1]
            rows = max(1, HEAD_FLOATS // vocab)
            for s in range(0, stop - first, rows):
                logits = hidden[s:s + rows] if head is None else head(hidden[s:s + rows])
                yield first + s, min(first + s + rows, stop), torch.log_softmax(logits.float(), dim=-1)
            if progress is not None:
                progress()


# --------------------------------------------------------------------------- KL arithmetic
def topk_tail(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (indices, log-probs) and log tail mass = logsumexp over the other tokens ([n])."""
    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return idx, vals, tail_logmass(logp, idx)


def tail_logmass(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log(sum of probs outside idx), exact even when the tail is 1e-9 (no 1 - sum cancellation)."""
    return logp.scatter(-1, idx, float("-inf")).logsumexp(-1)


def kl_topk_tail(idx: torch.Tensor, logp_k: torch.Tensor, logp_tail: torch.Tensor, logq: torch.Tensor) -> np.ndarray:
    """Per-token KL(p || q) over S = idx plus one tail bucket, in float64 ([n])."""
    lp = logp_k.double()
    lq = logq.gather(-1, idx).double()
    kl = (lp.exp() * (lp - lq)).sum(-1)
    lpt, lqt = logp_tail.double(), tail_logmass(logq, idx).double()
    tail = torch.where(torch.isneginf(lpt), torch.zeros_like(lpt), lpt.exp() * (lpt - lqt))  # 0 log 0 = 0
    return (kl + tail).cpu().numpy()


def kl_full(logp: torch.Tensor, logq: torch.Tensor) -> np.ndarray:
    """Per-token KL(p || q) over the whole vocabulary, in float64 ([n])."""
    lp, lq = logp.double(), logq.double()
    return (lp.exp() * (lp - lq)).sum(-1).cpu().numpy()


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
