"""How much does caching only the baseline's top-k log-probs (plus one tail bucket) lose?

For each variant, runs the baseline and the variant side by side on WikiText-2 windows
(the same windows quantstudy.stages.fidelity uses) and compares, per token, the full-vocabulary
KL(baseline || variant) in float64 with the top-k + tail lower bound for several k.
Optionally (--time-stage) times the product's fidelity stage at its default settings:
the first variant (baseline pass + variant pass) and a second variant (cache hit).

  flock /tmp/qs-heavy.lock .venv/bin/python benchmarks/fidelity_topk.py \
      --baseline /work/smollm2-hf --variant /tmp/rtn-w4g64 --data-dir ../shared/data --out topk.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantstudy.scoring.divergence import kl_full, kl_topk_tail, topk_tail, window_logprobs, windows
from quantstudy.stages.fidelity import load_text, tokenize


def topk_error(baseline: str, variant: str, ids: np.ndarray, L: int, ks: list[int]) -> dict:
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    wins = windows(len(ids), L, L)
    full, bound = [], {k: [] for k in ks}
    t0 = time.perf_counter()
    for (_, _, logp), (_, _, logq) in zip(window_logprobs(load(baseline), ids, wins, "cpu"),
                                          window_logprobs(load(variant), ids, wins, "cpu")):
        full.append(kl_full(logp, logq))
        for k in ks:
            bound[k].append(kl_topk_tail(*topk_tail(logp, k), logq))
    f = np.concatenate(full)
    out = {"variant": variant, "n_tokens": len(f), "seconds": round(time.perf_counter() - t0, 1),
           "full": {"mean": f.mean(), "median": np.median(f), "p99": np.percentile(f, 99)}, "k": {}}
    for k in ks:
        b = np.concatenate(bound[k])
        assert np.all(b <= f + 1e-9), "the top-k + tail KL must be a lower bound"  # log-sum inequality
        out["k"][k] = {"mean": b.mean(), "median": np.median(b), "p99": np.percentile(b, 99),
                       "mean_rel_error": 1 - b.mean() / f.mean(), "p99_rel_error": 1 - np.percentile(b, 99) / np.percentile(f, 99),
                       "max_token_gap": float((f - b).max()), "tokens_gap_over_10pct": float(np.mean(f - b > 0.1 * f))}
    return out


def time_stage(baseline: str, variants: list[str], data_dir: Path | None, fcfg: Any = None) -> dict:
    """Wall time of the fidelity stage (study.run_stage) (default: the config defaults)."""
    from rich.console import Console

    from quantstudy.config import FidelityConfig, ModelConfig, StudyConfig
    from quantstudy.runtime.context import RunContext
    from quantstudy.study import run_stage
    from quantstudy.store import ModelRecord, Store

    tmp = Path(tempfile.mkdtemp(prefix="qs-fid-time-"))
    cfg = StudyConfig(name="t", model=ModelConfig(source=baseline), fidelity=fcfg or FidelityConfig())
    ctx = RunContext(cfg=cfg, study_dir=tmp, config_dir=tmp, store=Store(tmp / "s.sqlite"), data_dir=data_dir,
                     device="cpu", console=Console(stderr=True))
    base = ModelRecord(name="baseline", role="baseline", path=baseline)
    out = {"settings": cfg.fidelity.model_dump(), "runs": []}
    for i, v in enumerate(variants):
        t0 = time.perf_counter()
        run_stage(ctx, "fidelity", ModelRecord(name=f"v{i}", role="quantized", path=v), parent=base)
        m = {n: val for _, n, val, _ in ctx.store.metrics(f"v{i}")}
        out["runs"].append({"variant": v, "seconds": round(time.perf_counter() - t0, 1),
                            "baseline_cached": i > 0, "metrics": m})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context-length", type=int, default=512)
    ap.add_argument("--ks", default="16,64,256")
    ap.add_argument("--time-stage", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    text, source = load_text("wikitext", a.data_dir)
    ids = tokenize(AutoTokenizer.from_pretrained(a.baseline), text, a.tokens)
    ks = [int(k) for k in a.ks.split(",")]
    res = {"baseline": a.baseline, "source": source, "context_length": a.context_length,
           "torch_threads": torch.get_num_threads(), "topk": []}
    for v in a.variant:
        r = topk_error(a.baseline, v, ids, a.context_length, ks)
        res["topk"].append(r)
        print(f"\n{v}: {r['n_tokens']} tokens, full-vocab KL mean {r['full']['mean']:.5f} median "
              f"{r['full']['median']:.5f} p99 {r['full']['p99']:.4f} ({r['seconds']} s)")
        print(f"{'k':>5} {'mean':>9} {'rel.err':>8} {'p99':>8} {'rel.err':>8} {'max gap':>8} {'>10% gap':>9}")
        for k, s in r["k"].items():
            print(f"{k:>5} {s['mean']:9.5f} {s['mean_rel_error']:8.2%} {s['p99']:8.4f} {s['p99_rel_error']:8.2%} "
                  f"{s['max_token_gap']:8.4f} {s['tokens_gap_over_10pct']:9.2%}")
    if a.time_stage:
        res["stage"] = time_stage(a.baseline, a.variant, a.data_dir)
        for r in res["stage"]["runs"]:
            print(f"stage: {r['variant']} {r['seconds']} s (baseline cached: {r['baseline_cached']})")
    if a.out:
        a.out.write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
