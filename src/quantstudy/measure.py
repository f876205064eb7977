"""Speed and memory of one model: greedy generation over a fixed prompt set, one prompt at a time.

The prompts are the first `evaluate.speed.prompts` ShareGPT first user turns (offline file or
hub), rendered with the model's chat template, so every variant of a study answers the same
prompts. Per prompt: latency, time to first token (prompt processing + first token), output
tokens (EOS counted), whether max_new_tokens was hit, whether the answer is empty.

The benchmark runs in a fresh spawned process that loads only this model. Peak memory is then
that process's own: on CPU the kernel's RSS high-water mark (VmHWM: exact, not sampled, and
it includes the interpreter and libraries, whose share before loading is recorded too); on
CUDA the allocator peak. An in-process ru_maxrss would still hold the peak of any model
loaded earlier in the run, so it cannot tell two variants apart.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from quantstudy.chat import render
from quantstudy.context import RunContext
from quantstudy.models import weights_size
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


def speed_prompts(ctx: RunContext, n: int) -> list[str]:
    """First user turn of the first n ShareGPT conversations (file order)."""
    from quantstudy.sources import load_conversations

    convs = load_conversations("sharegpt", ctx.data_dir, field="evaluate.speed", hub_limit=4 * n)
    firsts = [next((c for r, c in conv.messages if r == "user"), "") for conv in convs]
    return [p for p in firsts if p.strip()][:n]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB -> bytes
    return 0


def _bench(job: dict[str, Any], out: Any) -> None:
    """Child process: load the model, warm up, generate for every prompt, report stats and peak."""
    import torch

    from quantstudy.generation import generate_tokens
    from quantstudy.models import load_pretrained

    rss_before, load_before = _status("VmRSS"), os.getloadavg()[0]
    if job["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, tok = load_pretrained(Path(job["path"]), device=job["device"], dtype=job["dtype"],
                                 trust_remote_code=job["trust_remote_code"])
    chat = bool(getattr(tok, "chat_template", None))
    ids = [tok.encode(render(tok, [{"role": "user", "content": p}], job.get("chat_kwargs")), add_special_tokens=False)
           if chat else tok.encode(p) for p in job["prompts"]]
    for _ in range(job["warmup"]):  # first calls pay one-off costs (allocator, kernels, caches)
        generate_tokens(model, tok, [ids[0]], job["max_new_tokens"], [], job["device"])
    stats = []
    for i, p in enumerate(ids):
        g = generate_tokens(model, tok, [p], job["max_new_tokens"], [], job["device"])[0]
        text = tok.decode(g.tokens, skip_special_tokens=True)
        stats.append(asdict(GenStat(g.seconds, g.ttft_s, len(g.tokens), g.hit_max, not text.strip())))
        out.put(("progress", i + 1))
    packed = any(type(m).__name__ == "CompressedLinear" for m in model.modules())
    peak = torch.cuda.max_memory_allocated() if job["device"] == "cuda" else _status("VmHWM")
    out.put(("done", {"stats": stats, "peak": int(peak), "rss_before_load": rss_before, "chat_template": chat,
                      "packed": packed, "threads": torch.get_num_threads(),
                      "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}))


def _run_child(ctx: RunContext, job: dict[str, Any], label: str) -> dict[str, Any]:
    spawn = mp.get_context("spawn")  # a fresh interpreter: its peak memory is this model's alone
    q = spawn.Queue()
    proc = spawn.Process(target=_bench, args=(job, q), daemon=True)
    proc.start()
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=ctx.console) as progress:
        bar = progress.add_task(f"{label} · speed", total=len(job["prompts"]))
        while True:
            try:
                kind, val = q.get(timeout=1.0)
            except queue.Empty:
                if not proc.is_alive():
                    proc.join()
                    why = " (killed: out of memory?)" if proc.exitcode in (-9, 137) else ""
                    raise RuntimeError(f"speed benchmark of {label} exited with code {proc.exitcode}{why}")
                continue
            if kind == "done":
                proc.join()
                return val
            progress.update(bar, completed=val)


def _on_disk(path: Path) -> str:
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    q = cfg.get("quantization_config") or {}
    return f"{q.get('quant_method', 'quantized')} ({q.get('format', '?')})" if q else "dense"


def measure_model(ctx: RunContext, model: ModelRecord) -> None:
    speed = ctx.cfg.evaluate.speed if ctx.cfg.evaluate else None
    if speed is None:
        return
    prompts = speed_prompts(ctx, speed.prompts)
    job = {"path": model.path, "device": ctx.device, "dtype": ctx.cfg.model.dtype.value,
           "trust_remote_code": ctx.cfg.model.trust_remote_code, "prompts": prompts,
           "chat_kwargs": ctx.cfg.model.chat_template_kwargs,
           "max_new_tokens": speed.max_new_tokens, "warmup": speed.warmup}
    res = _run_child(ctx, job, model.name)
    stats = [GenStat(**s) for s in res["stats"]]
    info = {"backend": f"transformers-{ctx.device}",
            # transformers runs a compressed-tensors model as dense Linear layers on CPU
            "weights": "packed" if res["packed"] else "decompressed",
            "device": ctx.device, "dtype": job["dtype"], "n_prompts": len(prompts),
            "max_new_tokens": speed.max_new_tokens, "warmup": speed.warmup, "batch_size": 1,
            "chat_template": res["chat_template"], "threads": res["threads"],
            # other processes on the machine slow CPU timings: the 1-minute load before/after says how busy it was
            "cpu_load_1m": res["load_1m"],
            "prompts": "sharegpt " + ("offline" if ctx.data_dir else "hub") + f", first {len(prompts)} user turns",
            "measured": "wall clock per request, greedy, EOS counted as a token"}
    mem_info = {**info, "measured": "CUDA allocator peak (torch.cuda.max_memory_allocated)" if ctx.device == "cuda"
                else "process peak RSS (VmHWM of a fresh process that loaded only this model)",
                "rss_before_load_bytes": res["rss_before_load"]}
    disk_info = {"backend": "disk", "weights": "dense" if _on_disk(Path(model.path)) == "dense" else "packed",
                 "measured": "weight files on disk (*.safetensors / *.bin)", "format": _on_disk(Path(model.path))}
    with ctx.store.tx():
        for name, value in summarize(stats).items():
            ctx.store.put_metric(model.name, f"speed.{name}", value, info)
        ctx.store.put_metric(model.name, "memory.peak_bytes", float(res["peak"]), mem_info)
        ctx.store.put_metric(model.name, "memory.weights_bytes", float(weights_size(Path(model.path))), disk_info)
