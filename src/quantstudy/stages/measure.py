"""Speed and memory: each model in a fresh process, a derived model paired with its parent.

The prompts are the first `evaluate.speed.prompts` ShareGPT first user turns, rendered with the
model's chat template, so every model of a study answers the same prompts. A W4A16 model runs on
torch's packed int4 kernels (quantstudy.scoring.packed, bf16 activations) unless `evaluate.speed.backend`
is dense; its parent runs dense in the same activation dtype (bf16: how it would be deployed).

Every side is a spawned process that loads only its model, so its peak memory is its own: on CPU
the RSS high-water mark (VmHWM: exact, includes interpreter and libraries, whose share before
loading is recorded), on CUDA the allocator peak.

Speed-up is a paired measurement (quantstudy.stages.interleave): parent and child processes stay loaded
and take turns, round by round, over the same prompts (batch 1, then one batch of `speed.batch`);
the first side alternates between rounds. The ratio of decode rates comes with a bootstrap
interval over prompts, and the CPU time other processes used during each side is recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from quantstudy.config import StudyConfig
from quantstudy.data.chat import render
from quantstudy.stages.interleave import WARMUP_TOKENS
from quantstudy.records import Metric, Metrics, Record
from quantstudy.stages.protocol import Job, StageName
from quantstudy.errors import QuantStudyError
from quantstudy.runtime.modeldir import quantization_config, weights_size
from quantstudy.store import ModelRecord


@dataclass(frozen=True)
class GenStat:
    latency_s: float
    ttft_s: float
    n_tokens: int
    hit_max: bool
    empty: bool  # the decoded answer is empty or whitespace


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    s = sorted(xs)
    r = (len(s) - 1) * q / 100
    lo = int(r)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (r - lo)


def summarize(stats: list[GenStat]) -> dict[str, float]:
    lat, n = [s.latency_s for s in stats], len(stats)
    return {"latency_mean_s": sum(lat) / n, "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "ttft_mean_s": sum(s.ttft_s for s in stats) / n,
            "tokens_per_response": sum(s.n_tokens for s in stats) / n,
            "tokens_per_s": sum(s.n_tokens for s in stats) / sum(lat),  # output tokens over generation time
            "hit_max_share": sum(s.hit_max for s in stats) / n, "empty_share": sum(s.empty for s in stats) / n}


def speed_prompts(ctx: Job, n: int) -> list[str]:
    """First user turn of the first n ShareGPT conversations (file order)."""
    from quantstudy.data.conversations import load_conversations

    convs = load_conversations("sharegpt", ctx.data_dir, field="evaluate.speed", hub_limit=4 * n)
    firsts = [next((c for r, c in conv.messages if r == "user"), "") for conv in convs]
    return [p for p in firsts if p.strip()][:n]


def encode_prompts(tok: Any, prompts: list[str], chat_kwargs: dict[str, Any] | None = None) -> list[list[int]]:
    """Token ids of each prompt, through the chat template (with model.chat_template_kwargs) when the
    tokenizer has one."""
    if getattr(tok, "chat_template", None):
        return [tok.encode(render(tok, [{"role": "user", "content": p}], chat_kwargs), add_special_tokens=False)
                for p in prompts]
    return [tok.encode(p) for p in prompts]


def side_job(ctx: Job, model: ModelRecord, backend: str, dtype: str, prompts: list[str]) -> dict[str, Any]:
    speed = ctx.cfg.evaluate.speed
    return {"name": model.name, "path": model.path, "device": ctx.device, "backend": backend, "dtype": dtype,
            "trust_remote_code": ctx.cfg.model.trust_remote_code, "prompts": prompts,
            "chat_kwargs": ctx.cfg.model.chat_template_kwargs,
            "max_new_tokens": speed.max_new_tokens, "warmup": speed.warmup, "batch": speed.batch}


def labels(ctx: Job, job: dict[str, Any], side: dict[str, Any], batch: int) -> dict[str, Any]:
    """What a figure means: backend, weights, activation dtype, threads, batch size, load."""
    packed = job["backend"] == "packed"
    return {"backend": (f"torch-int4pack-{ctx.device}" if packed else "transformers-dense"),
            "weights": "packed" if packed else ("decompressed" if side["quantized"] else "dense"),
            "activation_dtype": job["dtype"], "device": ctx.device, "threads": side["threads"],
            # quantized activations (W8A8, FP8) as the loaded modules apply them (#22), like evaluate/fidelity record
            "activations": side.get("activations"),
            "batch_size": batch, "n_prompts": len(job["prompts"]), "max_new_tokens": job["max_new_tokens"],
            "warmup": job["warmup"], "warmup_tokens": min(job["max_new_tokens"], WARMUP_TOKENS),
            "chat_template": side["chat_template"], "rounds": side["rounds"],
            "interleaved": side.get("interleaved", "yes: round by round with the other side"),
            # prefill is a large-M matmul: the int4 kernel dequantizes per tile and is no faster than dense there
            "prefill": "not accelerated by the int4 kernel" if packed else "dense",
            "dense_layers": side.get("dense_layers", {}), "malloc_mmap_threshold": side.get("malloc_mmap_threshold"),
            "other_cpu_cores": side["other_cpu_cores"], "cpu_load_1m": side["load_1m"],
            "prompts": "sharegpt " + ("offline" if ctx.data_dir else "hub") + f", first {len(job['prompts'])} user turns",
            "measured": "wall clock per request, greedy, EOS counted as a token"}


def side_metrics(ctx: Job, job: dict[str, Any], side: dict[str, Any], prefix: str = "") -> list[Metric]:
    """One side's figures as `speed.{prefix}*` / `memory.{prefix}*` metrics."""
    out: list[Metric] = []
    info = labels(ctx, job, side, 1)
    for key, value in summarize([GenStat(**s) for s in side["stats"]]).items():
        out.append(Metric(f"speed.{prefix}{key}", value, info))
    out.append(Metric(f"speed.{prefix}prefill_s", side["prefill_s"],
                     {**info, "measured": "time to first token at batch 1 (prompt processing + one decode step), "
                      "mean over prompts and rounds"}))
    binfo = labels(ctx, job, side, side["batch"])
    out.append(Metric(f"speed.{prefix}batch_tokens_per_s", side["batch_tokens_per_s"],
                     {**binfo, "measured": f"generated tokens of one batch of {side['batch']} prompts over its wall "
                      "time (sequences drop out as they stop)"}))
    # the peak covers everything the process did: loading, batch-1 requests and the batch of side["batch"]
    how = ("CUDA allocator peak (torch.cuda.max_memory_allocated)" if ctx.device == "cuda" else
           "process peak RSS (VmHWM of a fresh process that loaded only this model)")
    out.append(Metric(f"memory.{prefix}peak_bytes", float(side["peak"]),
                     {**binfo, "measured": f"{how}, over loading, batch-1 requests and one batch of {side['batch']} "
                      f"prompts x {job['max_new_tokens']} new tokens", "rss_before_load_bytes": side["rss_before_load"]}))
    out.append(Metric(f"memory.{prefix}resident_weights_bytes", float(side["resident_bytes"]),
                     {**info, "measured": "bytes of parameters and buffers held after loading"}))
    return out


def _on_disk(path: Path) -> str:
    q = quantization_config(path)
    return f"{q.get('quant_method', 'quantized')} ({q.get('format', '?')})" if q else "dense"


def disk_metric(model: ModelRecord) -> Metric:
    fmt = _on_disk(Path(model.path))
    return Metric("memory.weights_bytes", float(weights_size(Path(model.path))),
                  {"backend": "disk", "weights": "dense" if fmt == "dense" else "packed",
                   "measured": "weight files on disk (*.safetensors / *.bin)", "format": fmt})


def measure_model(ctx: Job) -> Iterator[Record]:
    """A root model: dense in the deployment dtype (bf16) and float32, interleaved.
    A derived model: paired with its parent (dense bf16), interleaved, with the speed-up and its interval."""
    from quantstudy.stages.interleave import interleave, paired_ratio

    model, parent = ctx.model, ctx.parent
    speed = ctx.cfg.evaluate.speed if ctx.cfg.evaluate else None
    if speed is None:
        return
    prompts = speed_prompts(ctx, speed.prompts)
    act = "bfloat16"  # the packed kernels' activation dtype: the deployment comparison is made in it
    if parent is None:
        jobs = [side_job(ctx, model, "dense", act, prompts), side_job(ctx, model, "dense", "float32", prompts)]
        if side_bytes(model, 2) + side_bytes(model, 4) <= memory_available():
            bf16, fp32 = interleave(ctx, jobs, speed.rounds)
        else:  # both loaded at once would not fit: float32 is the secondary figure, so it goes after, labelled
            (bf16,), (fp32,) = interleave(ctx, jobs[:1], speed.rounds), interleave(ctx, jobs[1:], speed.rounds)
            fp32["interleaved"] = "no: measured after the bf16 side (both would not fit in memory together)"
        # how the deployment dtype compares with float32 on this machine (a CPU without native bf16 runs
        # bf16 matmuls slower than float32): every speed-up below is against bf16, and this puts it in scale
        dtype_ratio = paired_ratio(fp32, bf16, ctx.cfg.seed)
        if "interleaved" in fp32:  # measured one after the other: not a paired ratio
            dtype_ratio.update(comparable=False, why="not comparable: bf16 and float32 were measured one after "
                               "the other (both would not fit in memory together)")
        yield Metrics(model.name, side_metrics(ctx, jobs[0], bf16) + side_metrics(ctx, jobs[1], fp32, "float32.") + [
            Metric("speed.bf16_vs_float32", dtype_ratio["ratio"],
                   {**dtype_ratio, "measured": "batch-1 decode tokens/s of the model dense in bf16 / dense in "
                    "float32, same prompts, interleaved rounds; 95% bootstrap interval over prompts"}),
            disk_metric(model)])
        return
    from quantstudy.scoring.packed import is_w4a16

    packed = speed.backend.value == "packed" and is_w4a16(Path(model.path))
    need, have = side_bytes(parent, 2) + side_bytes(model, 1 if packed else 2), memory_available()
    if need > have:  # a pairing needs both loaded; an out-of-memory kill would say much less than this
        raise QuantStudyError(f"the paired speed measurement needs ~{need / 2**30:.1f} GiB (parent bf16 and "
                              f"{model.name} loaded at once), {have / 2**30:.1f} GiB is available",
                              field="evaluate.speed", value=model.name, fix="run on a machine with more memory, "
                              "or set evaluate.speed: null to skip speed and memory figures")
    jobs = [side_job(ctx, parent, "dense", act, prompts),
            side_job(ctx, model, "packed" if packed else "dense", act, prompts)]
    p_side, m_side = interleave(ctx, jobs, speed.rounds)
    ratio = paired_ratio(p_side, m_side, ctx.cfg.seed)
    kl = numerics_check(ctx, model, prompts) if packed else None
    out = side_metrics(ctx, jobs[1], m_side) + side_metrics(ctx, jobs[0], p_side, "parent.")
    out.append(Metric("speed.speedup", ratio["ratio"],
                      {**ratio, "parent": parent.name, "backend": labels(ctx, jobs[1], m_side, 1)["backend"],
                       "parent_backend": "transformers-dense", "activation_dtype": act}))
    for key, value in (kl or {}).items():
        out.append(Metric(f"numerics.{key}", value,
                          {"what": "packed int4 model vs the decompressed float32 model the evaluation uses, on "
                           "the speed prompts (teacher-forced prompt tokens)", "n_positions": kl["n_positions"]}))
    yield Metrics(model.name, out + [disk_metric(model)])


def side_bytes(model: ModelRecord, bytes_per_param: float) -> float:
    """Rough memory of one measuring process: weights at `bytes_per_param` (from config.json's shape;
    1 for packed 4-bit with bf16 embeddings, a generous round-up) plus ~1 GiB of interpreter, libraries
    and activations."""
    from quantstudy.runtime.estimate import params_from_config

    try:
        params = params_from_config(json.loads((Path(model.path) / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        params = weights_size(Path(model.path)) / 2  # unknown shape: assume 2-byte weights on disk
    return params * bytes_per_param + 2**30


def memory_available() -> float:
    import psutil

    return float(psutil.virtual_memory().available)


def numerics_check(ctx: Job, model: ModelRecord, prompts: list[str]) -> dict[str, float]:
    """KL(decompressed || packed) per position and top-1 agreement on the speed prompts' tokens.

    Runs in this process after the timed children have exited, so it touches no timed figure."""
    import torch

    from quantstudy.runtime.modeldir import load_pretrained
    from quantstudy.scoring.packed import load_packed

    trust = ctx.cfg.model.trust_remote_code
    packed, tok, _ = load_packed(Path(model.path), ctx.device, trust)
    dense, _ = load_pretrained(Path(model.path), ctx.device, "float32", trust)
    kl_sum, agree, n = 0.0, 0, 0
    with torch.inference_mode():
        for ids in encode_prompts(tok, prompts, ctx.cfg.model.chat_template_kwargs):
            x = torch.tensor([ids], device=ctx.device)
            lp = torch.log_softmax(packed(x).logits[0].float(), -1)  # [T, V]
            lq = torch.log_softmax(dense(x).logits[0].float(), -1)
            kl_sum += (lq.exp() * (lq - lp)).sum().item()
            agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
            n += x.shape[1]
    del packed, dense
    return {"kl_packed_vs_decompressed": kl_sum / n, "top1_packed_vs_decompressed": agree / n, "n_positions": n}


class Stage:
    """Measure: the key hashes the speed settings only (prompts, rounds, backend, batch)."""

    name = StageName.measure

    def key_inputs(self, cfg: StudyConfig) -> tuple[object, ...]:
        return (cfg.evaluate.speed,) if cfg.evaluate else ()

    def run(self, job: Job) -> Iterator[Record]:
        return measure_model(job)
