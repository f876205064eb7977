"""Dense float32, dense bf16 and packed int4 on the same prompts, interleaved, median of rounds.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/packed_speed.py BASE_DIR [W4A16_DIR ...] \\
        [--prompts 8] [--max-new-tokens 64] [--batch 8] [--rounds 3] [--data ../shared/data]

Every configuration is its own spawned process that loads only its model (so its peak RSS is its
own) and they take turns, round by round, over the same ShareGPT prompts (quantstudy.stages.interleave):
a load change hits every configuration alike. The base runs dense in float32 and bf16; each
W4A16 directory runs packed (torch int4 kernel, bf16 activations) and, for reference, as
transformers decompresses it (dense float32, what the evaluation uses).

Columns: decode tok/s at batch 1 = sum(tokens - 1) / sum(latency - time to first token), median
over rounds; request tok/s = tokens / latency (prefill included); batch-B tok/s = generated tokens
of one batch / its wall time; prefill = time to first token at batch 1 (mean); peak RSS = VmHWM of
the configuration's process; resident = bytes of parameters + buffers after loading; others =
cores used by other processes during its turns (0 = quiet machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from quantstudy.stages.interleave import cores, interleave
from quantstudy.stages.measure import speed_prompts

MiB = 2 ** 20


def job(name: str, path: Path, backend: str, dtype: str, prompts: list[str], a: argparse.Namespace) -> dict:
    return {"name": name, "path": str(path), "device": "cpu", "backend": backend, "dtype": dtype,
            "trust_remote_code": False, "prompts": prompts, "max_new_tokens": a.max_new_tokens,
            "warmup": 1, "batch": a.batch}


def decode_rates(side: dict) -> list[float]:
    """Per round: generated tokens after the first over the time after the first token."""
    return [sum(t - 1 for t, _, _ in r) / sum(lat - ttft for _, lat, ttft in r) for r in side["per_round"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("variants", type=Path, nargs="*")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-decompressed", action="store_true", help="skip the decompressed float32 variants")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    a = ap.parse_args()
    if a.rounds < 3:
        ap.error("--rounds must be at least 3 (the table shows medians)")
    prompts = speed_prompts(SimpleNamespace(data_dir=a.data), a.prompts)  # type: ignore[arg-type]
    jobs = [job("base", a.base, "dense", "float32", prompts, a), job("base", a.base, "dense", "bfloat16", prompts, a)]
    for v in a.variants:
        jobs.append(job(v.name, v, "packed", "bfloat16", prompts, a))
        if not a.no_decompressed:
            jobs.append(job(v.name, v, "dense", "float32", prompts, a))
    load0 = os.getloadavg()
    sides = interleave(SimpleNamespace(console=Console(stderr=True)), jobs, a.rounds)
    load1 = os.getloadavg()
    ref = statistics.median(decode_rates(sides[0]))
    print(f"\n{len(prompts)} ShareGPT prompts, max {a.max_new_tokens} new tokens, greedy, {a.rounds} interleaved "
          f"rounds (medians); batch {sides[0]['batch']}; {sides[0]['threads']} threads on {cores()} cores")
    hdr = ("model", "backend", "weights", "act", "decode tok/s b1", "vs fp32", "request tok/s", f"b{a.batch} tok/s",
           "prefill ms", "peak RSS MiB", "vs fp32", "RSS before load MiB", "resident MiB", "others")
    print("| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
    for j, s in zip(jobs, sides):
        dec = statistics.median(decode_rates(s))
        req = statistics.median(sum(t for t, _, _ in r) / sum(x for _, x, _ in r) for r in s["per_round"])
        weights = "packed" if j["backend"] == "packed" else ("decompressed" if s["quantized"] else "dense")
        backend = "torch-int4pack-cpu" if j["backend"] == "packed" else "transformers-dense"
        print(f"| {j['name']} | {backend} | {weights} | {j['dtype'].replace('bfloat16', 'bf16')} | {dec:.1f} | "
              f"{dec / ref:.2f}x | {req:.1f} | {s['batch_tokens_per_s']:.1f} | {1000 * s['prefill_s']:.0f} | "
              f"{s['peak'] / MiB:.0f} | {s['peak'] / sides[0]['peak']:.2f}x | {s['rss_before_load'] / MiB:.0f} | "
              f"{s['resident_bytes'] / MiB:.0f} | "
              f"{s['other_cpu_cores']:.2f} |")
        if s["dense_layers"]:
            print(f"|  ({len(s['dense_layers'])} quantized layers left dense: "
                  f"{sorted(set(s['dense_layers'].values()))}) |")
    print(f"\nload average (1/5/15 min) before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
          f"after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; per-turn 1-min load, first config: "
          f"{sides[0]['load_1m']}")


if __name__ == "__main__":
    main()
