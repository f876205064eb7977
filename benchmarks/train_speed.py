"""SFT speed on CPU: TRL's defaults (the issue 8 reference) vs quantstudy's CPU defaults.

Both recipes train SmolLM2-135M-Instruct with LoRA r=16 alpha=32 on all linear layers,
batch 8, max length 384, lr 2e-4 cosine, on the SAME OpenMathInstruct-2 samples (default
200, 25 steps), from the same weights and seed. They differ only in what changes speed:

  baseline  float32, gradient checkpointing (TRL's default), random batches, LoRA dropout 0.05,
            TRL's CPU LM head (vocabulary projection at every position, prompt and padding too)
  defaults  TrainConfig defaults: float32, no gradient checkpointing, dropout 0, the loss head
            only where a token carries loss, computed densely (train_head.py), and one row per
            forward pass (`rows_per_forward: 1`: the same random batches of 8, gradients
            accumulated over their rows, no padding)

Wall time covers the whole `train.fit` call (model load, tokenizing, training, merge). A
logged training loss is one batch's loss, and length grouping changes which rows share the
last batch, so the two recipes' final logged losses are different quantities; the table
therefore also gives each merged model's completion loss (float32) on the same held-out
rows (default 100), compared pairwise with a 95% bootstrap interval: that is the like-for-like
"final loss". Each recipe runs in a fresh process.

  flock /tmp/qs-heavy.lock .venv/bin/python benchmarks/train_speed.py            # ~20 min
  .venv/bin/python benchmarks/train_speed.py --samples 16 --heldout 4            # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from quantstudy.runtime.progress import make_progress
from rich.table import Table

from quantstudy.report import stats
from quantstudy.stages import train
from quantstudy.data import train_data
from quantstudy.config import TrainConfig
from quantstudy.runtime.modeldir import load_pretrained
from quantstudy.runtime.resources import track_peak_memory

REPO = Path(__file__).resolve().parents[1]


def heldout_nll(model, tok, samples) -> tuple[list[float], list[int]]:
    """Per held-out row: summed completion NLL (nats) of the reply and its token count, prompts
    rendered by the chat template. Mean = sum(nll) / sum(tokens)."""
    nll, count = [], []
    model.eval()
    for c in samples:
        prompt = tok.apply_chat_template(c.as_dicts()[:-1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(c.as_dicts(), tokenize=False)
        ids = tok(full, add_special_tokens=False, return_tensors="pt", truncation=True, max_length=384).input_ids
        start = len(tok(prompt, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        tgt = ids[0, start:]
        nll.append(-logp[start - 1:-1].gather(1, tgt[:, None]).sum().item())
        count.append(len(tgt))
    return nll, count


# name -> (TrainConfig changes, SFTConfig overrides, vocabulary projection on labelled positions
# only). Only "baseline" and "defaults" run by default; the others split the gain into its parts
# (--recipes baseline,fp32-nogc,...).
ONE_PASS = {"rows_per_forward": 8}  # the whole batch of 8 in one padded forward, as TRL does
FP32_RANDOM = {**ONE_PASS, "bf16_autocast": False, "group_by_length": False,
               "lora": {"r": 16, "alpha": 32, "dropout": 0.05}}
RECIPES = {
    "baseline": (FP32_RANDOM, {"gradient_checkpointing": True}, False),
    "fp32-nogc": (FP32_RANDOM, {}, False),
    "fp32-nogc-grouped": ({**FP32_RANDOM, "group_by_length": True}, {}, False),
    "fp32-onepass": (ONE_PASS, {}, True),  # the defaults with one padded forward per batch
    "bf16-onepass": ({**ONE_PASS, "bf16_autocast": True}, {}, True),  # the previous defaults
    "bf16-onepass-allpos": ({**ONE_PASS, "bf16_autocast": True}, {}, False),
    "bf16-grouped": ({**ONE_PASS, "bf16_autocast": True, "group_by_length": True}, {}, True),
    "bf16": ({"bf16_autocast": True}, {}, True),  # the defaults in bf16
    "defaults-2rows": ({"rows_per_forward": 2}, {}, True),
    "defaults": ({}, {}, True),
}


def run(recipe: str, model_dir: Path, samples, heldout, cfg: TrainConfig, console: Console) -> dict:
    changes, overrides, compact_head = RECIPES[recipe]
    cfg = TrainConfig.model_validate({**cfg.model_dump(), **changes})
    if not compact_head:  # TRL's own CPU behaviour: the head projects every position
        train.head_on_labelled_positions = contextlib.nullcontext
    t0, c0 = time.perf_counter(), time.process_time()
    with track_peak_memory("cpu") as mem:
        trainer, merged, tok = train.fit(model_dir, samples, cfg, "cpu", make_progress(console), Path("/tmp/qs-train-speed") / recipe,
                                         label=recipe, **overrides)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    nll, count = heldout_nll(merged, tok, heldout)
    curve = train.loss_curve(trainer)
    tokens = int(trainer.state.num_input_tokens_seen)
    args = trainer.args
    return {"recipe": recipe, "wall_s": wall, "cpu_s": cpu, "steps": trainer.state.global_step, "tokens": tokens,
            "tokens_per_s": tokens / wall, "first_loss": curve[0][1], "final_loss": curve[-1][1],
            "mean_loss_last5": sum(v for _, v in curve[-5:]) / len(curve[-5:]),
            "heldout_nll": sum(nll) / sum(count), "heldout_rows": nll, "heldout_tokens": count,
            "peak_rss_gb": mem.bytes / 1e9,
            "bf16": bool(args.bf16), "gradient_checkpointing": bool(args.gradient_checkpointing),
            "sampler": args.train_sampling_strategy, "rows_per_forward": cfg.forward_rows("cpu"),
            "lora_dropout": cfg.lora.dropout, "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("QS_SMOLLM2", "/work/smollm2-hf")))
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--recipes", default="baseline,defaults")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed (data order, LoRA init); the 200 rows and held-out rows stay the same")
    ap.add_argument("--reuse", default="", help="recipes whose result of an earlier run (same samples) is reused")
    ap.add_argument("--one", choices=sorted(RECIPES), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not (a.model / "config.json").is_file():
        from quantstudy.stages.resolve import materialize_builtin

        a.model = materialize_builtin("smollm2-135m-instruct", Path("/tmp/qs-model-cache"))
    console = Console(width=150)
    cfg = TrainConfig(samples=a.samples)  # seed 0 picks the rows; --seed only changes the training run
    pool = train_data.load_pool(cfg, a.data_dir, REPO)
    samples, _ = train_data.select_samples(pool, a.samples, cfg.seed, set())
    used = {c.id for c in samples}
    heldout = [c for c in pool if c.id not in used][: a.heldout]
    console.print(f"SmolLM2-135M LoRA r{cfg.lora.r}, {len(samples)} OpenMathInstruct-2 samples, batch "
                  f"{cfg.batch_size}, max length {cfg.max_seq_len}, torch threads {torch.get_num_threads()}, "
                  f"load average {os.getloadavg()[0]:.2f}")
    cfg = TrainConfig.model_validate({**cfg.model_dump(), "seed": a.seed})
    if a.one:  # child process: one recipe, result as JSON
        a.json.write_text(json.dumps(run(a.one, a.model, samples, heldout, cfg, console)))
        return
    results = []
    for r in a.recipes.split(","):
        # A fresh process per recipe: peak RSS and allocator state are not inherited from the previous one.
        out = Path(f"/tmp/qs-train-speed-{r}.json" if a.seed == 0 else f"/tmp/qs-train-speed-{r}-seed{a.seed}.json")
        if r in a.reuse.split(",") and out.is_file():
            results.append(json.loads(out.read_text()))
            continue
        subprocess.run([sys.executable, __file__, "--one", r, "--json", str(out), "--model", str(a.model),
                        "--data-dir", str(a.data_dir), "--samples", str(a.samples), "--heldout", str(a.heldout),
                        "--seed", str(a.seed)],
                       check=True)
        results.append(json.loads(out.read_text()))
    base, tok = load_pretrained(a.model)
    nll, count = heldout_nll(base, tok, heldout)
    base_nll = sum(nll) / sum(count)

    t = Table(title=f"SFT on CPU, {len(samples)} samples; held-out = {len(heldout)} other rows "
                    f"(base model {base_nll:.4f} nats/token)")
    for col in ("recipe", "wall", "CPU", "steps", "tokens", "tok/s", "first loss", "final loss", "last-5 mean",
                "held-out loss", "peak RSS"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(r["recipe"], f"{r['wall_s'] / 60:.1f} min", f"{r['cpu_s'] / 60:.1f} min", str(r["steps"]),
                  str(r["tokens"]), f"{r['tokens_per_s']:.0f}", f"{r['first_loss']:.4f}", f"{r['final_loss']:.4f}",
                  f"{r['mean_loss_last5']:.4f}", f"{r['heldout_nll']:.4f}", f"{r['peak_rss_gb']:.2f} GB")
    console.print(t)
    first, last = results[0], results[-1]
    console.print(f"{first['recipe']} / {last['recipe']}: wall {first['wall_s'] / last['wall_s']:.2f}x, "
                  f"CPU time {first['cpu_s'] / last['cpu_s']:.2f}x. CPU time is process user+sys over 2 cores; "
                  "wall time also counts other processes sharing the machine")
    # Is the faster recipe's held-out loss worse? Paired over the same rows, token-weighted, with a
    # 95% percentile-bootstrap interval: a difference inside it is noise of this held-out set.
    paired = {}
    for r in results[1:]:
        pb = stats.paired_bootstrap(np.array(first["heldout_rows"]), np.array(r["heldout_rows"]),
                                    np.array(first["heldout_tokens"]))
        paired[r["recipe"]] = vars(pb)
        console.print(f"held-out loss {r['recipe']} - {first['recipe']}: {pb.diff:+.4f} nats/token, 95% paired "
                      f"bootstrap interval [{pb.diff_lo:+.4f}, {pb.diff_hi:+.4f}] over {pb.n} rows, p = {pb.p:.3f}")
    if a.json:
        a.json.write_text(json.dumps({"base_heldout_nll": base_nll, "paired_heldout": paired, "results": results},
                                     indent=1))


if __name__ == "__main__":
    main()
