"""Evaluation speed: lm-evaluation-harness vs quantstudy's evaluate stage, same model, same items.

    flock /tmp/qs-heavy.lock .venv/bin/python benchmarks/eval_speed.py --task arc_easy [--limit N] [--runs 3]

lm-eval side: `lm_eval.simple_evaluate` (what `lm_eval --model hf` calls) with
`pretrained=DIR,dtype=float32`, batch 16, CPU, on its own arc_easy.yaml / hellaswag.yaml
(through `include:`) pointed at the offline files. quantstudy side: `evaluate_model` (the
evaluate stage: item selection, prompts, FastScorer, store writes, metrics) into a fresh store.
Each run is a fresh process (model load included on both sides, nothing cached between runs,
peak RSS per run from the kernel's VmHWM); the two sides alternate, which side goes first
alternates too. Items: ARC-Easy **dev** (570, the issue's reference set) or the first N of
HellaSwag validation. The llama.cpp HellaSwag file has no ctx_a/ctx_b columns, so both sides
get the documents as quantstudy's reader restores them; lm-eval still runs its own process_docs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LM_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
DEFAULT_LIMIT = {"arc_easy": None, "hellaswag": 500}


def peak_rss() -> int:
    """Kernel high-water mark of this process's resident set (bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def quantstudy_task(name: str):
    from quantstudy.config import TaskName
    from quantstudy.tasks import get_task
    from quantstudy.tasks.arc import ArcTask

    return ArcTask(TaskName.arc_easy, "ARC-Easy", split="validation") if name == "arc_easy" else get_task(name)


def lm_eval_files(task: str, data: Path, tmp: Path) -> str:
    """Offline docs in the hub's columns + a task yaml including lm-eval's own; returns the task name."""
    if task == "arc_easy":
        rows = [json.loads(x) for x in (data / "arc/ARC-Easy/ARC-Easy-Dev.jsonl").open()]
        docs = [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]
        base, split = "arc/arc_easy.yaml", "validation"
    else:  # activity_label + ": " + ctx_a + " " + ctx_b.capitalize() rebuilds the query exactly
        docs = []
        for it in quantstudy_task(task).eval_items(data):
            label, _, ctx = it.doc["query"].partition(": ")
            docs.append({"id": it.id, "activity_label": label, "ctx_a": ctx, "ctx_b": "",
                         "endings": it.doc["choices"], "label": str(it.doc["gold"])})
        base, split = "hellaswag/hellaswag.yaml", "validation"
    (tmp / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp / "task.yaml").write_text(
        f"include: {LM_TASKS / base}\ntask: qs_bench_{task}\ndataset_path: json\ndataset_name: null\n"
        f"test_split: null\ntraining_split: null\nvalidation_split: {split}\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {tmp / 'docs.jsonl'}\n")
    return f"qs_bench_{task}"


def run_lmeval(a: argparse.Namespace) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as d:
        name = lm_eval_files(a.task, Path(a.data_dir), Path(d))
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={a.model},dtype=float32", tasks=[name],
                                      batch_size=16, device="cpu", limit=a.limit, log_samples=True,
                                      task_manager=TaskManager(include_path=d, include_defaults=False))
        wall = time.perf_counter() - t0
    preds = {}
    for s in out["samples"][name]:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        lens = [len(c) for c in (s["doc"]["choices"]["text"] if a.task == "arc_easy" else s["doc"]["choices"])]
        preds[str(s["doc"]["id"])] = [_argmax(lls), _argmax([v / n for v, n in zip(lls, lens)])]
    return {"wall": wall, "preds": preds}


def run_quantstudy(a: argparse.Namespace) -> dict:
    from rich.console import Console

    import quantstudy.evaluate as ev
    from quantstudy.config import parse_config
    from quantstudy.context import RunContext
    from quantstudy.store import ModelRecord, Store

    task = quantstudy_task(a.task)
    ev.get_task = lambda name: task  # the stage's arc_easy is the test split; the reference set is dev
    cfg = parse_config({"name": "bench", "model": {"source": a.model},
                        "evaluate": {"tasks": [{"name": a.task, "limit": a.limit}], "batch_size": 16,
                                     "backend": "fast", "speed": None}})
    with tempfile.TemporaryDirectory() as d, Store(Path(d) / "store.sqlite") as store:
        ctx = RunContext(cfg=cfg, study_dir=Path(d), config_dir=Path(d), store=store, data_dir=Path(a.data_dir),
                         device="cpu", console=Console(stderr=True, quiet=True))
        t0 = time.perf_counter()
        ev.evaluate_model(ctx, ModelRecord("baseline", "baseline", a.model))
        wall = time.perf_counter() - t0
        preds = {r.item_id: [int(r.prediction), int(r.details["pred_norm"])] for _, r in store.items("baseline")}
    return {"wall": wall, "preds": preds}


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def task_tokens(a: argparse.Namespace) -> tuple[int, int]:
    """Tokens lm-eval's HFLM feeds (ctx + cont - 1 per request), and the distinct prefixes of
    those sequences: what a prefix tree computes with every shared prefix once (FastScorer
    comes close: it builds one tree per scoring call and copies a path when it cuts the tree)."""
    from transformers import AutoTokenizer

    from quantstudy.fastscore import LMEvalTokens
    from quantstudy.prefixtree import Trie

    enc, task = LMEvalTokens(AutoTokenizer.from_pretrained(a.model)), quantstudy_task(a.task)
    full, trie = 0, Trie()
    for it in task.eval_items(Path(a.data_dir))[:a.limit]:
        pairs = [enc.encode_pair(task.doc_to_text(it.doc), " " + c) for c in task.doc_to_choice(it.doc)]
        full += sum(len(c) + len(k) - 1 for c, k in pairs)
        for c, k in pairs:
            trie.add((c + k)[:-1], 0)
    return full, len(trie.tok)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["arc_easy", "hellaswag"], required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", default=None, help="HF model dir (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--worker", choices=["lmeval", "quantstudy"], help=argparse.SUPPRESS)
    a = p.parse_args()
    a.limit = a.limit if a.limit is not None else DEFAULT_LIMIT[a.task]
    if a.worker:
        load0 = os.getloadavg()[0]
        res = (run_lmeval if a.worker == "lmeval" else run_quantstudy)(a)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        print("RESULT " + json.dumps({**res, "peak_rss": peak_rss(), "cpu_s": ru.ru_utime + ru.ru_stime,
                                      "load": [load0, os.getloadavg()[0]]}))
        return
    if a.model is None:
        from quantstudy.models import materialize_builtin

        a.model = str(materialize_builtin("smollm2-135m-instruct", Path("/tmp/qs-model-cache")))
    full, shared = task_tokens(a)
    runs: dict[str, list[dict]] = {"lmeval": [], "quantstudy": []}
    for r in range(a.runs):
        for side in (("lmeval", "quantstudy") if r % 2 == 0 else ("quantstudy", "lmeval")):
            cmd = [sys.executable, __file__, "--worker", side, "--task", a.task, "--model", a.model,
                   "--data-dir", a.data_dir] + (["--limit", str(a.limit)] if a.limit else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{side} run failed:\n{out.stderr[-3000:]}")
            runs[side].append(json.loads(line[7:]))
            res = runs[side][-1]
            print(f"run {r + 1} {side:<10} {res['wall']:7.1f} s wall, {res['cpu_s']:7.1f} s CPU (process), "
                  f"load avg {res['load'][0]:.1f} -> {res['load'][1]:.1f}", flush=True)
    report(a, runs, full, shared)


def report(a: argparse.Namespace, runs: dict[str, list[dict]], full: int, shared: int) -> None:
    med = {k: statistics.median(r["wall"] for r in v) for k, v in runs.items()}
    ref, ours = runs["lmeval"][0]["preds"], runs["quantstudy"][0]["preds"]
    ids = sorted(ref)
    assert set(ids) == set(ours), "the two sides scored different items"
    acc_same = sum(ref[i][0] == ours[i][0] for i in ids) / len(ids)
    norm_same = sum(ref[i][1] == ours[i][1] for i in ids) / len(ids)
    stable = all(r["preds"] == ours for r in runs["quantstudy"])
    print(f"\n{a.task}: {len(ids)} items, {a.model}, float32, CPU, batch 16, {a.runs} runs each (median)")
    print(f"tokens: lm-eval feeds {full:,} (context + continuation per choice); each shared prefix once: {shared:,}")
    print(f"{'':<12}{'wall s (median)':>16}{'all runs':>24}{'best':>8}{'task tok/s':>12}{'peak RSS GiB':>14}")
    for k, v in runs.items():
        walls = ", ".join(f"{r['wall']:.1f}" for r in v)
        print(f"{k:<12}{med[k]:>16.1f}{walls:>24}{min(r['wall'] for r in v):>8.1f}{full / med[k]:>12.0f}"
              f"{max(r['peak_rss'] for r in v) / 2**30:>14.2f}")
    best = min(r["wall"] for r in runs["lmeval"]) / min(r["wall"] for r in runs["quantstudy"])
    print(f"speed-up (lm-eval / quantstudy): {med['lmeval'] / med['quantstudy']:.2f}x median, {best:.2f}x best-of")
    loads = [x for v in runs.values() for r in v for x in r["load"]]
    print(f"1-min load average during runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs "
          f"(above ~{os.cpu_count()}: other processes competed, timings inflated)")
    print(f"identical predictions: acc {acc_same:.2%}, acc_norm {norm_same:.2%}"
          f"{'' if stable else ' (quantstudy predictions varied between runs!)'}")
    for k, v in (("lm-eval", ref), ("quantstudy", ours)):
        print(f"  {k:<11} acc {sum(x[0] == g for x, g in zip([v[i] for i in ids], gold(a, ids))) / len(ids):.4f}")


def gold(a: argparse.Namespace, ids: list[str]) -> list[int]:
    task = quantstudy_task(a.task)
    by_id = {it.id: task.gold(it.doc) for it in task.eval_items(Path(a.data_dir))}
    return [by_id[i] for i in ids]


if __name__ == "__main__":
    main()
