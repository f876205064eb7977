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

Generative tasks (#21): `--task gsm8k` (first 100 test items, lm-eval's gsm8k.yaml: 5-shot drawn
by its seeded sampler from train, stop strings, 256 new tokens, both filters) and `--task squad_v2`
(first 200 dev questions, 0-shot, until "\n", 256 new tokens). lm-eval's squadv2 is a Python class
that loads the hub dataset and the `evaluate` hub metric, neither reachable offline, so its side runs
a YAML task with the class's exact prompt and stop string through the same simple_evaluate/HFLM
generate_until path; the class's second request per item (log p(" unanswerable"), only used for
best_exact/best_f1) is not run, which leaves lm-eval's side faster than the real task. EM/F1 are
computed from each side's texts with quantstudy's port of the official script. Both sides report
the positions each ran through the model: lm-eval's from its `_model_generate` batches (rows x
padded width prefill, rows x steps decode: finished rows keep computing until the batch ends),
quantstudy's from generation.STATS. `--save FILE` appends each run to FILE and reports all runs in
it, so three alternating runs can be made in separate invocations (each a ~10-minute slot).
`--only lmeval --items A:B` runs lm-eval on items A..B-1 of the first --limit only: lm-eval's GSM8K-100
(~25-30 min on 2 cores, every batch of 16 running to 256 tokens) does not fit one lock slot, so it runs
as parts, each a fresh process (model load included), through simple_evaluate's `samples`. The report
joins parts that cover the first --limit items into one run (walls, CPU and counts summed, peak RSS the
largest). lm-eval sorts and batches each part's requests by itself, so its batches differ from one
100-item run's: a row's padding (and float rounding) and the steps its batch runs can differ.
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
DEFAULT_LIMIT = {"arc_easy": None, "hellaswag": 500, "gsm8k": 100, "squad_v2": 200}
GENERATIVE = ("gsm8k", "squad_v2")
MAX_NEW = 256  # lm-eval's max_gen_toks default, the evaluate stage's max_new_tokens default


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
    elif task == "gsm8k":  # lm-eval's own gsm8k.yaml on the offline train/test files
        (tmp / "task.yaml").write_text(
            f"include: {LM_TASKS / 'gsm8k/gsm8k.yaml'}\ntask: qs_bench_gsm8k\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    train: {data / 'gsm8k/train.jsonl'}\n    test: {data / 'gsm8k/test.jsonl'}\n")
        return "qs_bench_gsm8k"
    elif task == "squad_v2":  # lm-eval's squadv2 class prompt and stop, as YAML (see the module docstring)
        docs = [{**it.doc, "answers": it.doc["answers"]} for it in quantstudy_task(task).eval_items(data)]
        (tmp / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tmp / "task.yaml").write_text(json.dumps({
            "task": "qs_bench_squad_v2", "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(tmp / "docs.jsonl")}},
            "validation_split": "validation", "output_type": "generate_until", "num_fewshot": 0,
            "doc_to_text": "Title: {{title}}\n\nBackground: {{context}}\n\nQuestion: {{question}}\n\nAnswer:",
            "doc_to_target": "{{answers[0] if answers else 'unanswerable'}}",
            "generation_kwargs": {"until": ["\n"]}, "metric_list": [{"metric": "exact_match"}]}))
        return "qs_bench_squad_v2"
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
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    counts = {"prompt_tokens": 0, "prefill_positions": 0, "decode_positions": 0, "prefill_s": 0.0, "decode_s": 0.0,
              "batches": 0, "steps": 0}
    generate = HFLM._model_generate

    def counted(self, context, max_length, stop, **kw):  # the positions HF generate computes per batch
        out = generate(self, context, max_length, stop, **kw)
        rows, width = context.shape
        steps = out.shape[1] - width  # every row runs until the whole batch stops
        counts["prompt_tokens"] += int(kw["attention_mask"].sum()) if "attention_mask" in kw else rows * width
        counts["prefill_positions"] += rows * width
        counts["decode_positions"] += rows * max(0, steps - 1)
        counts["batches"], counts["steps"] = counts["batches"] + 1, counts["steps"] + steps
        return out

    def timed(model):  # forward time split by kind: prompt (several positions) vs one-token steps
        t = {}
        model.register_forward_pre_hook(lambda m, args, kw: t.update(t0=time.perf_counter()), with_kwargs=True)
        model.register_forward_hook(lambda m, args, kw, out: counts.update({
            k: counts[k] + time.perf_counter() - t["t0"]
            for k in ["prefill_s" if (kw.get("input_ids", args[0] if args else None)).shape[1] > 1 else "decode_s"]}),
            with_kwargs=True)

    init = HFLM.__init__

    def hooked_init(self, *args, **kw):
        init(self, *args, **kw)
        timed(self.model)

    HFLM._model_generate, HFLM.__init__ = counted, hooked_init
    with tempfile.TemporaryDirectory() as d:
        name = lm_eval_files(a.task, Path(a.data_dir), Path(d))
        items = {"samples": {name: list(range(*a.items))}} if a.items else {"limit": a.limit}
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={a.model},dtype=float32", tasks=[name],
                                      batch_size=16, device="cpu", log_samples=True,
                                      task_manager=TaskManager(include_path=d, include_defaults=False), **items)
        wall = time.perf_counter() - t0
    if a.task in GENERATIVE:
        texts, contexts = {}, {}
        for smp in out["samples"][name]:
            key = f"test/{smp['doc_id']}" if a.task == "gsm8k" else smp["doc"]["id"]
            texts[key], contexts[key] = smp["resps"][0][0], smp["arguments"][0][0]
        return {"wall": wall, "texts": texts, "contexts": contexts, "counts": counts, "items": a.items or [0, a.limit],
                "results": {k: v for k, v in out["results"][name].items() if isinstance(v, (int, float))}}
    preds = {}
    for s in out["samples"][name]:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        lens = [len(c) for c in (s["doc"]["choices"]["text"] if a.task == "arc_easy" else s["doc"]["choices"])]
        preds[str(s["doc"]["id"])] = [_argmax(lls), _argmax([v / n for v, n in zip(lls, lens)])]
    return {"wall": wall, "preds": preds}


def run_quantstudy(a: argparse.Namespace) -> dict:
    from rich.console import Console

    import quantstudy.stages.evaluate as ev
    from quantstudy.config import parse_config
    from quantstudy.runtime.context import RunContext
    from quantstudy.store import ModelRecord, Store

    from quantstudy.scoring import generation

    task = quantstudy_task(a.task)
    ev.get_task = lambda name: task  # the stage's arc_easy is the test split; the reference set is dev
    cfg = parse_config({"name": "bench", "model": {"source": a.model},
                        "evaluate": {"tasks": [{"name": a.task, "limit": a.limit}], "batch_size": 16,
                                     "backend": "fast", "speed": None, "max_new_tokens": MAX_NEW}})
    from quantstudy.study import run_stage

    with tempfile.TemporaryDirectory() as d, Store(Path(d) / "store.sqlite") as store:
        ctx = RunContext(cfg=cfg, study_dir=Path(d), config_dir=Path(d), store=store, data_dir=Path(a.data_dir),
                         device="cpu", console=Console(stderr=True, quiet=True))
        t0 = time.perf_counter()
        run_stage(ctx, "evaluate", ModelRecord("baseline", "baseline", a.model))  # the evaluate stage, store writes included
        wall = time.perf_counter() - t0
        recs = [r for _, r in store.items("baseline")]
        if a.task in GENERATIVE:
            items = task.eval_items(Path(a.data_dir))[:a.limit]
            contexts = {p.item.id: p.context for p in ev.build_prompts(task, items, Path(a.data_dir), None, 1234, None)}
            lat = [r.latency_s for r in recs]
            return {"wall": wall, "texts": {r.item_id: r.details["text"] for r in recs}, "contexts": contexts,
                    "counts": vars(generation.STATS), "tokens": [r.n_tokens for r in recs],
                    "hit_max": sum(bool(r.hit_max) for r in recs), "latency_sum": sum(lat),
                    "results": {m: v for _, m, v, _ in store.metrics("baseline") if m.startswith(f"eval.{a.task}.")}}
        preds = {r.item_id: [int(r.prediction), int(r.details["pred_norm"])] for r in recs}
    return {"wall": wall, "preds": preds}


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def task_tokens(a: argparse.Namespace) -> tuple[int, int]:
    """Tokens lm-eval's HFLM feeds (ctx + cont - 1 per request), and the distinct prefixes of
    those sequences: what a prefix tree computes with every shared prefix once (FastScorer
    comes close: it builds one tree per scoring call and copies a path when it cuts the tree)."""
    from transformers import AutoTokenizer

    from quantstudy.scoring.fastscore import LMEvalTokens
    from quantstudy.scoring.prefixtree import Trie

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
    p.add_argument("--task", choices=["arc_easy", "hellaswag", *GENERATIVE], required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", default=None, help="HF model dir (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--save", default=None, help="JSON file: append this invocation's runs, report all runs in it")
    p.add_argument("--only", choices=["lmeval", "quantstudy"], help="run one side only (with --save: a run in two slots)")
    p.add_argument("--items", default=None, help="A:B, with --only lmeval: items A..B-1 only (one part of a run)")
    p.add_argument("--worker", choices=["lmeval", "quantstudy"], help=argparse.SUPPRESS)
    a = p.parse_args()
    a.limit = a.limit if a.limit is not None else DEFAULT_LIMIT[a.task]
    if a.items:
        a.items = [int(x) for x in a.items.split(":")]
        if (a.worker or a.only) != "lmeval" or a.task not in GENERATIVE or not 0 <= a.items[0] < a.items[1] <= a.limit:
            p.error(f"--items {a.items[0]}:{a.items[1]}: needs --only lmeval, a generative task and "
                    f"0 <= A < B <= --limit ({a.limit})")
    if a.worker:
        load0 = os.getloadavg()[0]
        res = (run_lmeval if a.worker == "lmeval" else run_quantstudy)(a)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        print("RESULT " + json.dumps({**res, "peak_rss": peak_rss(), "cpu_s": ru.ru_utime + ru.ru_stime,
                                      "load": [load0, os.getloadavg()[0]]}))
        return
    if a.model is None:
        from quantstudy.stages.resolve import materialize_builtin

        a.model = str(materialize_builtin("smollm2-135m-instruct", Path("/tmp/qs-model-cache")))
    gen = a.task in GENERATIVE
    full, shared = (0, 0) if gen else task_tokens(a)
    runs: dict[str, list[dict]] = {"lmeval": [], "quantstudy": []}
    if a.save and Path(a.save).is_file():  # earlier invocations' runs of the same benchmark
        runs = json.loads(Path(a.save).read_text())["runs"]
    for r in range(a.runs):
        k = len(runs["lmeval"]) + len(runs["quantstudy"])  # which side goes first alternates across invocations too
        for side in (("lmeval", "quantstudy") if (k // 2) % 2 == 0 else ("quantstudy", "lmeval")):
            if a.only and side != a.only:
                continue
            cmd = [sys.executable, __file__, "--worker", side, "--task", a.task, "--model", a.model,
                   "--data-dir", a.data_dir] + (["--limit", str(a.limit)] if a.limit else []) \
                + (["--items", "{}:{}".format(*a.items)] if a.items else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{side} run failed:\n{out.stderr[-3000:]}")
            runs[side].append(json.loads(line[7:]))
            res = runs[side][-1]
            part = " items {}:{}".format(*a.items) if a.items else ""
            print(f"run {r + 1} {side:<10}{part} {res['wall']:7.1f} s wall, {res['cpu_s']:7.1f} s CPU (process), "
                  f"load avg {res['load'][0]:.1f} -> {res['load'][1]:.1f}", flush=True)
            if a.save:
                Path(a.save).write_text(json.dumps({"task": a.task, "limit": a.limit, "model": a.model, "runs": runs}))
    if gen:
        runs = {k: joined(v, a.limit) for k, v in runs.items()}
    if not (runs["lmeval"] and runs["quantstudy"]):
        return
    if gen:
        report_generative(a, runs)
    else:
        report(a, runs, full, shared)


def joined(side_runs: list[dict], limit: int) -> list[dict]:
    """One side's runs, parts (--items) that cover items 0..limit-1 in order joined into one run each."""
    whole = [r for r in side_runs if r.get("items", [0, limit]) == [0, limit]]
    parts = sorted((r for r in side_runs if r.get("items", [0, limit]) != [0, limit]), key=lambda r: r["items"][0])
    chain: list[dict] = []
    for r in parts:
        if r["items"][0] != (chain[-1]["items"][1] if chain else 0):
            continue  # a repeated or stray part; a full chain starts at item 0
        chain.append(r)
        if r["items"][1] == limit:
            whole.append({"wall": sum(x["wall"] for x in chain), "cpu_s": sum(x["cpu_s"] for x in chain),
                          "peak_rss": max(x["peak_rss"] for x in chain), "parts": [x["items"] for x in chain],
                          "load": [v for x in chain for v in x["load"]], "items": [0, limit],
                          "texts": {k: v for x in chain for k, v in x["texts"].items()},
                          "contexts": {k: v for x in chain for k, v in x["contexts"].items()},
                          "counts": {k: sum(x["counts"][k] for x in chain) for k in chain[0]["counts"]}})
            chain = []
    return whole


def print_speedup_and_load(runs: dict[str, list[dict]], med: dict[str, float]) -> None:
    """The speed-up lines and the load the runs saw, shared by the multiple-choice and generative reports."""
    best = min(r["wall"] for r in runs["lmeval"]) / min(r["wall"] for r in runs["quantstudy"])
    print(f"speed-up (lm-eval / quantstudy): {med['lmeval'] / med['quantstudy']:.2f}x median, {best:.2f}x best-of")
    loads = [x for v in runs.values() for r in v for x in r["load"]]
    print(f"1-min load average during runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs "
          f"(above ~{os.cpu_count()}: other processes competed, timings inflated)")


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
    print_speedup_and_load(runs, med)
    print(f"identical predictions: acc {acc_same:.2%}, acc_norm {norm_same:.2%}"
          f"{'' if stable else ' (quantstudy predictions varied between runs!)'}")
    for k, v in (("lm-eval", ref), ("quantstudy", ours)):
        print(f"  {k:<11} acc {sum(x[0] == g for x, g in zip([v[i] for i in ids], gold(a, ids))) / len(ids):.4f}")


def report_generative(a: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    med = {k: statistics.median(r["wall"] for r in v) for k, v in runs.items()}
    ref, ours = runs["lmeval"][0], runs["quantstudy"][0]
    ids = sorted(ref["texts"])
    assert set(ids) == set(ours["texts"]), "the two sides answered different items"
    n = len(ids)
    print(f"\n{a.task}: {n} items, {a.model}, float32, CPU, batch 16, {MAX_NEW} new tokens max, "
          f"{len(runs['lmeval'])}/{len(runs['quantstudy'])} runs (lm-eval/quantstudy; median)")
    print(f"{'':<12}{'wall s (median)':>16}{'all runs':>28}{'best':>8}{'CPU s':>8}{'peak RSS GiB':>14}")
    for k, v in runs.items():
        walls = ", ".join(f"{r['wall']:.1f}" for r in v)
        print(f"{k:<12}{med[k]:>16.1f}{walls:>28}{min(r['wall'] for r in v):>8.1f}"
              f"{statistics.median(r['cpu_s'] for r in v):>8.1f}{max(r['peak_rss'] for r in v) / 2**30:>14.2f}")
    for k, v in runs.items():
        for r in v:
            if "parts" in r:
                print(f"  {k}: a run of {len(r['parts'])} parts, items " + ", ".join(f"{x}:{y}" for x, y in r["parts"])
                      + " (walls summed: each part loads the model and builds the task again)")
    print_speedup_and_load(runs, med)
    print("model positions computed (first run of each side; prompt tokens = without padding or sharing):")
    print(f"{'':<12}{'prompt tok':>11}{'prefill pos':>12}{'decode pos':>11}{'prefill s':>10}{'decode s':>9}")
    for k, r in (("lm-eval", ref), ("quantstudy", ours)):
        c = r["counts"]
        print(f"{k:<12}{c['prompt_tokens']:>11,}{c['prefill_positions']:>12,}{c['decode_positions']:>11,}"
              f"{c['prefill_s']:>10.1f}{c['decode_s']:>9.1f}")
    print(f"quantstudy: {sum(ours['tokens']):,} tokens generated, {ours['hit_max']} of {n} hit {MAX_NEW}; per-item "
          f"latencies sum to {ours['latency_sum']:.1f} s (each request's share of the forward passes it was in)")
    if ours["counts"].get("cache_bytes"):
        print(f"quantstudy slot cache: {ours['counts']['cache_bytes'] / 2**30:.2f} GiB "
              f"({ours['counts']['steps']} decode steps)")
    same_prompt = sum(ref["contexts"][i] == ours["contexts"][i] for i in ids)
    print(f"identical prompts: {same_prompt}/{n}")
    same = [i for i in ids if ref["texts"][i] == ours["texts"][i]]
    stable = {k: all(r["texts"] == v[0]["texts"] for r in v) for k, v in runs.items()}
    print(f"identical generated text: {len(same)}/{n} = {len(same) / n:.1%}"
          + "".join(f" ({k} varied between runs!)" for k, ok in stable.items() if not ok))
    for i in ids:
        x, y = ref["texts"][i], ours["texts"][i]
        if x != y:
            tx, ty = tok.encode(x, add_special_tokens=False), tok.encode(y, add_special_tokens=False)
            t = next((j for j, (u, w) in enumerate(zip(tx, ty)) if u != w), min(len(tx), len(ty)))
            c = next((j for j, (u, w) in enumerate(zip(x, y)) if u != w), min(len(x), len(y)))
            print(f"  {i}: first difference at generated token {t} (char {c}): lm-eval {x[c:c + 30]!r} "
                  f"vs quantstudy {y[c:c + 30]!r}")
    for k, r in (("lm-eval", ref), ("quantstudy", ours)):
        print(f"  {k:<11} " + ", ".join(f"{m} {v:.4f}" for m, v in gen_scores(a, r["texts"]).items()))


def gen_scores(a: argparse.Namespace, texts: dict[str, str]) -> dict[str, float]:
    """The task's metrics from generated texts, quantstudy's scoring (lm-eval's filters / the official SQuAD rules)."""
    docs = {it.id: it.doc for it in quantstudy_task(a.task).eval_items(Path(a.data_dir))}
    if a.task == "gsm8k":
        from quantstudy.tasks.gsm8k import extract, matches

        ok = [[matches(e, docs[i]["answer"]) for e in extract(t)] for i, t in texts.items()]
        return {"exact_match strict": sum(o[0] for o in ok) / len(ok), "flexible": sum(o[1] for o in ok) / len(ok)}
    from quantstudy.tasks.squad import squad_scores

    sc = [squad_scores(docs[i]["answers"], t) for i, t in texts.items()]
    return {"EM": sum(e for e, _ in sc) / len(sc), "F1": sum(f for _, f in sc) / len(sc)}


def gold(a: argparse.Namespace, ids: list[str]) -> list[int]:
    task = quantstudy_task(a.task)
    by_id = {it.id: task.gold(it.doc) for it in task.eval_items(Path(a.data_dir))}
    return [by_id[i] for i in ids]


if __name__ == "__main__":
    main()
