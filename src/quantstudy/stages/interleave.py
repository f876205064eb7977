"""Interleaved speed measurement of several models, each in its own loaded process, and the paired ratio.

A speed-up measured at two different times compares two machines: on a shared 2-core box the
load of other jobs changes by 2-6x within minutes. So the sides stay loaded in their own spawned
processes and take turns over the same prompts, round by round (the first side alternates), and
the CPU time used by *other* processes during each side's turn is recorded: /proc/stat busy time
minus the measured process's own CPU time (getrusage), in cores. Load average is recorded too,
but it counts our own threads and lags by a minute, so it cannot tell a competitor from us.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

MMAP_THRESHOLD = 256 << 10  # bytes; see fixed_mmap_threshold
BUSY_MARGIN = 0.5  # cores: competing demand beyond the spare cores, or a difference between sides, above this
N_BOOT = 2000
WARMUP_TOKENS = 8  # new tokens per warm-up call


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB -> bytes
    return 0


def busy_seconds() -> float:
    """CPU-seconds the cores this process may run on spent busy since boot (/proc/stat's per-core
    lines: user nice system irq softirq steal). Only our affinity set: a job on other cores of a
    bigger host does not compete with us, and `cores()` counts the same set."""
    mine, ticks = os.sched_getaffinity(0), 0
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *fields = line.split()
            if int(name[3:]) in mine:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
                ticks += user + nice + system + irq + softirq + steal
    return ticks / os.sysconf("SC_CLK_TCK")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def fixed_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """glibc: serve blocks above `nbytes` by mmap and give them back at free.

    By default glibc raises its mmap threshold after the first large free, so the loading
    transients (unpacking int4, float32 -> bf16 conversion) stay in a fragmented heap and in the
    RSS high-water mark: measured loading SmolLM2 GPTQ W4 g64 packed, peak RSS 827 MiB by default,
    673 MiB with a fixed 256 KiB threshold. No library exposes mallopt, hence ctypes."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, nbytes) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: the default allocator policy stays
        return False


def _worker(job: dict[str, Any], inq: Any, outq: Any) -> None:
    """Child: load one model, warm up, then answer 'single' / 'batch' / 'stop' commands."""
    import resource
    import traceback

    os.environ["TQDM_DISABLE"] = "1"  # compressed-tensors' per-layer progress bars would flood the console
    fixed = fixed_mmap_threshold()  # every side alike: dense and packed are measured under one allocator policy
    try:
        import torch

        from quantstudy.scoring.batchgen import generate_tokens
        from quantstudy.stages.measure import GenStat, encode_prompts
        from quantstudy.runtime.modeldir import is_compressed, load_pretrained
        from quantstudy.config.schemes import activation_handling, prepare_loaded

        def cpu() -> float:
            r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
            return r.ru_utime + r.ru_stime

        rss_before, dev, n_new = _status("VmRSS"), job["device"], job["max_new_tokens"]
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        dense_layers: dict[str, str] = {}
        if job["backend"] == "packed":
            from quantstudy.scoring.packed import load_packed

            model, tok, rep = load_packed(Path(job["path"]), dev, job["trust_remote_code"])
            resident, dense_layers = rep.resident_bytes, rep.dense
            activations = activation_handling(model)
        else:
            from quantstudy.scoring.packed import resident_bytes

            model, tok = load_pretrained(Path(job["path"]), dev, job["dtype"], job["trust_remote_code"])
            activations = prepare_loaded(model)  # what the timed model does to its activations, read off its modules
            resident = resident_bytes(model)
        ids = encode_prompts(tok, job["prompts"], job.get("chat_kwargs"))
        batch = ids[:job["batch"]]
        for _ in range(job["warmup"]):  # first calls pay one-off costs (allocator, kernel selection, caches);
            # a few tokens suffice for that, and a full-length warm-up doubled the stage's time on a CPU
            generate_tokens(model, tok, [ids[0]], min(n_new, WARMUP_TOKENS), [], dev)
            generate_tokens(model, tok, batch, min(n_new, WARMUP_TOKENS), [], dev)
        outq.put(("ready", None))
        while (cmd := inq.get()) != "stop":
            c0 = cpu()
            if cmd == "single":
                stats = []
                for p in ids:
                    g = generate_tokens(model, tok, [p], n_new, [], dev)[0]
                    text = tok.decode(g.tokens, skip_special_tokens=True)
                    stats.append(asdict(GenStat(g.seconds, g.ttft_s, len(g.tokens), g.hit_max, not text.strip())))
                outq.put(("result", {"stats": stats, "cpu_s": cpu() - c0}))
            else:
                gens = generate_tokens(model, tok, batch, n_new, [], dev)
                outq.put(("result", {"tokens": sum(len(g.tokens) for g in gens),
                                     "seconds": max(g.seconds for g in gens), "cpu_s": cpu() - c0}))
        peak = torch.cuda.max_memory_allocated() if dev == "cuda" else _status("VmHWM")
        outq.put(("done", {"peak": int(peak), "rss_before_load": rss_before, "resident_bytes": int(resident),
                           "threads": torch.get_num_threads(), "chat_template": bool(getattr(tok, "chat_template",
                                                                                                None)),
                           "quantized": is_compressed(Path(job["path"])), "dense_layers": dense_layers,
                           "activations": activations,
                           "batch": len(batch), "malloc_mmap_threshold": MMAP_THRESHOLD if fixed else None}))
    except Exception:  # the driver re-raises it with the model's name
        outq.put(("error", traceback.format_exc()))


class _Side:
    def __init__(self, job: dict[str, Any]) -> None:
        spawn = mp.get_context("spawn")  # a fresh interpreter: its peak memory is this model's alone
        self.job, self.inq, self.outq = job, spawn.Queue(), spawn.Queue()
        self.proc = spawn.Process(target=_worker, args=(job, self.inq, self.outq), daemon=True)
        self.proc.start()

    def get(self, kind: str) -> Any:
        while True:
            try:
                got, val = self.outq.get(timeout=1.0)
            except queue.Empty:
                if not self.proc.is_alive():
                    self.proc.join()
                    why = " (killed: out of memory?)" if self.proc.exitcode in (-9, 137) else ""
                    raise RuntimeError(f"speed benchmark of {self.job['name']} exited with code "
                                       f"{self.proc.exitcode}{why}") from None
                continue
            if got == "error":
                raise RuntimeError(f"speed benchmark of {self.job['name']} failed in its process:\n{val}")
            assert got == kind, (got, kind)
            return val

    def run(self, cmd: str) -> tuple[dict[str, Any], float, float]:
        """(result, wall seconds, cores used by other processes meanwhile)."""
        b0, t0 = busy_seconds(), time.perf_counter()
        self.inq.put(cmd)
        res = self.get("result")
        wall, busy = time.perf_counter() - t0, busy_seconds() - b0
        return res, wall, max(0.0, busy - res["cpu_s"]) / wall


def interleave(ctx: Any, jobs: list[dict[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """Measure the jobs in alternating rounds; one dict per job (stats of every round, batch rate,
    prefill, peak memory, other processes' CPU use and load average per round)."""
    sides = [_Side(j) for j in jobs]
    out: list[dict[str, Any]] = [{"stats": [], "per_round": [], "batch_rates": [], "others": [], "load_1m": []}
                                 for _ in jobs]
    try:
        for s in sides:
            s.get("ready")
        progress = ctx.progress  # the driver's view: rich bars on a terminal, timed plain lines elsewhere
        bar = progress.add_task(" vs ".join(j["name"] + f" ({j['backend']} {j['dtype']})" for j in jobs) +
                                " · speed", total=rounds * len(jobs) * 2)
        for r in range(rounds):
            order = list(range(len(jobs)))[::(-1 if r % 2 else 1)]
            for cmd in ("single", "batch"):
                for i in order:
                    res, wall, others = sides[i].run(cmd)
                    o = out[i]
                    o["others"].append(others)
                    o["load_1m"].append(round(os.getloadavg()[0], 2))
                    if cmd == "single":
                        o["stats"] += res["stats"]
                        o["per_round"].append([(s["n_tokens"], s["latency_s"], s["ttft_s"])
                                               for s in res["stats"]])
                    else:
                        o["batch_rates"].append(res["tokens"] / res["seconds"])
                    progress.advance(bar)
        for s, o in zip(sides, out):
            s.inq.put("stop")
            o.update(s.get("done"))
            s.proc.join()
    finally:
        for s in sides:
            if s.proc.is_alive():
                s.proc.kill()
    for o in out:
        o["rounds"] = rounds
        o["batch_tokens_per_s"] = sorted(o["batch_rates"])[len(o["batch_rates"]) // 2]  # median over rounds
        o["prefill_s"] = sum(s["ttft_s"] for s in o["stats"]) / len(o["stats"])
        o["other_cpu_cores"] = round(sum(o["others"]) / len(o["others"]), 3)
    return out


def paired_ratio(parent: dict[str, Any], model: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Speed-up = model's batch-1 decode rate / parent's, with a 95% bootstrap interval resampling
    prompts (each prompt keeps all its rounds), and whether the machine was quiet enough for the
    ratio to mean anything. Decode rate = tokens after the first / time after the first token, pooled
    over prompts and rounds: prefill is reported on its own (the int4 kernel does not speed it up)."""
    import numpy as np

    def rate(side: dict[str, Any], idx: np.ndarray) -> float:
        a = np.array(side["per_round"], dtype=float)  # [rounds, prompts, (tokens, latency s, ttft s)]
        return (a[:, idx, 0] - 1).sum() / (a[:, idx, 1] - a[:, idx, 2]).sum()

    n = len(parent["per_round"][0])
    allp = np.arange(n)
    ratio = rate(model, allp) / rate(parent, allp)
    rng = np.random.default_rng(seed)
    boots = [rate(model, i) / rate(parent, i) for i in (rng.integers(0, n, n) for _ in range(N_BOOT))]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    n_cores, threads = cores(), max(parent["threads"], model["threads"])
    op, om = parent["other_cpu_cores"], model["other_cpu_cores"]
    spare = max(0, n_cores - threads)
    busy = max(op, om) > spare + BUSY_MARGIN
    uneven = abs(op - om) > BUSY_MARGIN
    load = threads + max(op, om)
    why = (f"not comparable: the machine was busy (load {load:.1f} on {n_cores} cores)" if busy else
           f"not comparable: the machine's load differed between the sides (other processes used {op:.1f} "
           f"cores during the parent, {om:.1f} during this model; {n_cores} cores)" if uneven else "")
    return {"ratio": float(ratio), "lo": float(lo), "hi": float(hi), "comparable": not (busy or uneven),
            "why": why, "cores": n_cores, "threads": threads, "other_cpu_cores_parent": op,
            "other_cpu_cores_model": om, "cpu_load_1m_parent": parent["load_1m"], "cpu_load_1m_model": model["load_1m"],
            "rounds": parent["rounds"], "n_prompts": n,
            "measured": "batch-1 decode tokens/s (after the first token) of this model / its parent's, same "
                        "prompts, interleaved rounds; 95% bootstrap interval over prompts",
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
