"""Slow: per-item agreement with `lm_eval --model hf` on SmolLM2-135M, ARC-Easy dev (570 questions).

lm-eval runs its own arc_easy.yaml (through `include:`) pointed at the offline ARC-Easy Dev file,
converted to the hub's columns by this test, with the same settings as `lm_eval --model hf
--model_args pretrained=DIR,dtype=float32 --batch_size 16` (simple_evaluate is what the CLI
calls). Our side goes through the product path (build_prompts + score_prompts) with each backend.
Run: flock /tmp/qs-heavy.lock .venv/bin/pytest -m slow tests/test_lmeval_agreement.py -s
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest

from quantstudy.config import TaskName
from quantstudy.stages.evaluate import build_prompts, score_prompts
from quantstudy.tasks.arc import ArcTask

pytestmark = pytest.mark.slow
LM_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, shared_data: Path, smollm2_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("arc_dev")
    files = {}
    for split, name in (("train", "Train"), ("validation", "Dev")):
        rows = [json.loads(x) for x in (shared_data / f"arc/ARC-Easy/ARC-Easy-{name}.jsonl").open()]
        files[split] = tmp / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({
            "id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                        "label": [c["label"] for c in r["question"]["choices"]]}}) + "\n" for r in rows))
    (tmp / "arc_dev.yaml").write_text(
        f"include: {LM_TASKS / 'arc/arc_easy.yaml'}\ntask: qs_arc_easy_dev\ndataset_path: json\ndataset_name: null\n"
        f"test_split: null\ndataset_kwargs:\n  data_files:\n    train: {files['train']}\n"
        f"    validation: {files['validation']}\n")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={smollm2_dir},dtype=float32",
                                      tasks=["qs_arc_easy_dev"], batch_size=16, device="cpu", log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp), include_defaults=False))
    wall = time.perf_counter() - t0
    samples = out["samples"]["qs_arc_easy_dev"]
    preds = {}
    for s in samples:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        preds[s["doc"]["id"]] = (max(range(len(lls)), key=lambda i: (lls[i], -i)), lls, s["acc"])
    acc = out["results"]["qs_arc_easy_dev"]["acc,none"]
    print(f"\nlm-eval simple_evaluate (hf, float32, batch 16): {len(preds)} questions, acc {acc:.4f}, {wall:.1f} s")
    return {"preds": preds, "acc": acc, "wall": wall}


@pytest.mark.parametrize("backend", ["fast", "lmeval"])
def test_arc_easy_dev_agrees_with_lm_eval(reference: dict, shared_data: Path, smollm2_dir: Path,
                                          backend: str) -> None:
    from quantstudy.scoring.lmeval_backend import LMEvalScorer
    from quantstudy.runtime.modeldir import load_pretrained

    model, tok = load_pretrained(smollm2_dir, device="cpu", dtype="float32")
    if backend == "fast":
        from quantstudy.scoring.fastscore import FastScorer

        scorer = FastScorer(model, tok, batch_size=16, device="cpu")
    else:
        scorer = LMEvalScorer(model, tok, batch_size=16, device="cpu")
    task = ArcTask(TaskName.arc_easy, "ARC-Easy", split="validation")
    t0 = time.perf_counter()
    prompts = build_prompts(task, task.eval_items(shared_data), shared_data, None, 1234, None)
    recs = score_prompts(task, prompts, scorer, 256, chat=False)
    wall = time.perf_counter() - t0

    ref = reference["preds"]
    assert len(recs) == len(ref) == 570
    agree = sum(int(r.prediction) == ref[r.item_id][0] for r in recs) / len(recs)
    acc = sum(bool(r.correct) for r in recs) / len(recs)
    max_dll = max(abs(a - b) for r in recs for a, b in zip(r.details["loglikelihoods"], ref[r.item_id][1]))
    print(f"\nquantstudy[{scorer.name}]: acc {acc:.4f} vs lm-eval {reference['acc']:.4f}; agreement {agree:.2%}; "
          f"max |d loglik| {max_dll:.2e} nats; {wall:.1f} s (lm-eval {reference['wall']:.1f} s)")
    assert agree >= 0.995
    assert abs(acc - reference["acc"]) <= 0.005
    assert all(float(bool(r.correct)) == ref[r.item_id][2] for r in recs if int(r.prediction) == ref[r.item_id][0])
