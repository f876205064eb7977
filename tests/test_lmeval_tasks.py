"""lm-eval tasks by registry name or user YAML (#20), checked against lm-eval itself.

The user tasks are lm-eval YAML written here, reading ../shared/data in place (dataset_path json /
text + data_files): a multiple-choice task (ARC-Easy), a generate_until task with a regex filter
(GSM8K, first number of the answer) and a rolling-loglikelihood task (WikiText-2 lines). Each runs
through quantstudy's evaluation stage (prefix-sharing scorer, batched generation) and through
`lm_eval.simple_evaluate(model="hf")` (what `lm_eval --model hf` calls) on the same model and
YAML; per-item predictions must agree on >= 99.5% of items and aggregates within 0.5 points.
Fast tests use a tiny random Llama; the slow ones SmolLM2-135M (timings printed).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from quantstudy.config import LMEvalTaskSpec, parse_config
from quantstudy.runtime.context import RunContext
from quantstudy.errors import QuantStudyError
from quantstudy.store import ModelRecord, Store
from quantstudy.study import run_stage
from tests.test_evaluate import tiny_model

MC = """task: qs_arc_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {d}/arc/ARC-Easy/ARC-Easy-Train.jsonl
    validation: {d}/arc/ARC-Easy/ARC-Easy-Dev.jsonl
output_type: multiple_choice
training_split: train
validation_split: validation
num_fewshot: 2
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN = """task: qs_gsm_gen
dataset_path: json
dataset_kwargs:
  data_files:
    train: {d}/gsm8k/train.jsonl
    test: {d}/gsm8k/test.jsonl
output_type: generate_until
training_split: train
test_split: test
fewshot_split: train
num_fewshot: 2
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  max_gen_toks: 32
  do_sample: false
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9][0-9.,]*)"
      - function: take_first
metric_list:
  - metric: exact_match
"""
ROLL = """task: qs_wiki_roll
dataset_path: text
dataset_kwargs:
  data_files:
    test: {d}/wikitext-2-raw/wiki.test.raw
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
FUNC = """task: qs_func
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {d}/arc/ARC-Easy/ARC-Easy-Dev.jsonl
output_type: multiple_choice
validation_split: validation
doc_to_text: !function helpers.doc_to_text
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
"""


def write_tasks(root: Path, data: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("mc", MC), ("gen", GEN), ("roll", ROLL)):
        (root / f"{name}.yaml").write_text(text.format(d=data))
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lmeval_tasks") / "tasks", shared_data)


def study(root: Path, tasks: list[dict], backend: str = "fast", **evaluate) -> RunContext:
    cfg = parse_config({"name": "t", "model": {"source": "x"},
                        "evaluate": {"batch_size": 8, "backend": backend, "speed": None, "tasks": tasks, **evaluate}})
    return RunContext(cfg=cfg, study_dir=root, config_dir=root, store=Store(root / "store.sqlite"), data_dir=None,
                      device="cpu", console=Console(quiet=True))


def reference(model_dir: Path, task_dir: Path, name: str, limit: int) -> tuple[dict, dict, float]:
    """lm-eval's own run (what `lm_eval --model hf --tasks NAME --include_path DIR --limit N` does):
    doc id -> logged sample, the task's results, wall seconds."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=[name],
                                      batch_size=8, device="cpu", limit=limit, log_samples=True,
                                      task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    wall = time.perf_counter() - t0
    return {s["doc_id"]: s for s in out["samples"][name]}, out["results"][name], wall


def ours(root: Path, model_dir: Path, task_dir: Path, name: str, limit: int) -> tuple[dict, dict, float]:
    ctx = study(root, [{"lmeval": name, "include_path": str(task_dir), "limit": limit}])
    t0 = time.perf_counter()
    run_stage(ctx, "evaluate", ModelRecord(name="m", role="baseline", path=str(model_dir)))
    wall = time.perf_counter() - t0
    recs = {int(r.item_id): r for _, r in ctx.store.items("m", name)}
    metrics = {n.split(".", 2)[2]: v for _, n, v, _ in ctx.store.metrics("m") if n.startswith(f"eval.{name}.")}
    return recs, metrics, wall


def compare(kind: str, recs: dict, ref: dict, ref_res: dict, metrics: dict) -> tuple[float, float, float]:
    """(share of items with the same prediction, our aggregate, lm-eval's aggregate)."""
    assert sorted(recs) == sorted(ref)
    same = 0
    for d, r in recs.items():
        s = ref[d]
        if kind == "mc":
            lls = [float(x[0]) for x in s["filtered_resps"]]
            same += int(r.prediction) == max(range(len(lls)), key=lambda i: (lls[i], -i))
            assert max(abs(a - b) for a, b in zip(r.details["loglikelihoods"], lls)) < 1e-3
        elif kind == "gen":
            same += r.prediction == s["filtered_resps"][0]
        else:  # rolling: the document's log-likelihood (nats)
            same += math.isclose(r.details["logprob"], float(s["filtered_resps"][0]), rel_tol=1e-4, abs_tol=1e-3)
    key = {"mc": ("acc", "acc,none"), "gen": ("exact_match,first-number", "exact_match,first-number"),
           "roll": ("word_perplexity", "word_perplexity,none")}[kind]
    return same / len(recs), metrics[key[0]], ref_res[key[1]]


def check(kind: str, name: str, tmp: Path, model_dir: Path, task_dir: Path, limit: int) -> str:
    recs, metrics, wall = ours(tmp, model_dir, task_dir, name, limit)
    ref, ref_res, ref_wall = reference(model_dir, task_dir, name, limit)
    agree, a, b = compare(kind, recs, ref, ref_res, metrics)
    line = (f"{name}: n={len(recs)} agreement {agree:.2%}; quantstudy {a:.4f} vs lm-eval {b:.4f}; "
            f"wall {wall:.1f} s vs {ref_wall:.1f} s")
    print("\n" + line)
    assert agree >= 0.995, line
    if kind == "roll":
        assert abs(a / b - 1) <= 0.005, line  # perplexity: within 0.5%
    else:
        assert abs(a - b) <= 0.005, line
    return line


# ------------------------------------------------------------------ fast: tiny random model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny") / "m", shared_data, 0)


@pytest.mark.parametrize("kind,name,limit", [("mc", "qs_arc_mc", 40), ("gen", "qs_gsm_gen", 12),
                                             ("roll", "qs_wiki_roll", 40)])
def test_yaml_task_agrees_with_lm_eval_tiny(kind: str, name: str, limit: int, tmp_path: Path, tiny: Path,
                                            task_dir: Path) -> None:
    check(kind, name, tmp_path, tiny, task_dir, limit)


def test_items_resume_and_feed_the_report(tmp_path: Path, tiny: Path, task_dir: Path, shared_data: Path) -> None:
    """Stored like the built-ins: a re-run scores nothing; two models give paired comparisons with flips."""
    from quantstudy.report.items import Kind, compare as pair, column, load_items, task_metrics

    other = tiny_model(tmp_path / "m1", shared_data, 1)
    tasks = [{"lmeval": n, "include_path": str(task_dir), "limit": 10} for n in ("qs_arc_mc", "qs_gsm_gen", "qs_wiki_roll")]
    ctx = study(tmp_path, tasks)
    for name, path in (("a", tiny), ("b", other)):
        run_stage(ctx, "evaluate", ModelRecord(name=name, role="baseline", path=str(path)))
    timing = lambda: [v for _, n, v, _ in ctx.store.metrics("a") if n == "time.eval.qs_arc_mc"]  # noqa: E731
    before = timing()
    run_stage(ctx, "evaluate", ModelRecord(name="a", role="baseline", path=str(tiny)))
    assert timing() == before and len(before) == 1  # nothing was rescored (a rescore rewrites the time)
    items = load_items(ctx.store)
    kinds = {}
    for task in ("qs_arc_mc", "qs_gsm_gen", "qs_wiki_roll"):
        mt = task_metrics(task, items["a"][task])[0]
        kinds[task] = (mt.name, mt.kind)
        c = pair("a", "b", mt, column(items["a"][task], mt), column(items["b"][task], mt))
        assert c is not None and c.n == 10
    assert kinds == {"qs_arc_mc": ("acc", Kind.binary), "qs_gsm_gen": ("exact_match,first-number", Kind.binary),
                     "qs_wiki_roll": ("word_perplexity", Kind.perplexity)}
    gen = items["a"]["qs_gsm_gen"][0]
    assert gen.n_tokens and gen.hit_max is not None and "exact_match,first-number" in gen.details["metrics"]


def test_group_subtasks_and_aggregate_agree_with_lm_eval(tmp_path: Path, tiny: Path, task_dir: Path) -> None:
    """A user group over two tasks: each subtask stored and scored on its own, the group's aggregate
    (size-weighted mean) equal to lm-eval's for the same model and items."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    gdir = tmp_path / "g"
    gdir.mkdir()
    for f in task_dir.glob("*.yaml"):
        (gdir / f.name).write_text(f.read_text())
    (gdir / "zero.yaml").write_text("include: mc.yaml\ntask: qs_arc_mc0\nnum_fewshot: 0\n")
    (gdir / "group.yaml").write_text("group: qs_group\ntask: [qs_arc_mc, qs_arc_mc0]\naggregate_metric_list:\n"
                                     "  - {metric: acc, aggregation: mean, weight_by_size: true}\n")
    ctx = study(tmp_path, [{"lmeval": "qs_group", "include_path": str(gdir), "limit": 12}])
    run_stage(ctx, "evaluate", ModelRecord(name="m", role="baseline", path=str(tiny)))
    got = {n: v for _, n, v, _ in ctx.store.metrics("m")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny},dtype=float32", tasks=["qs_group"],
                                      batch_size=8, device="cpu", limit=12,
                                      task_manager=TaskManager(include_path=str(gdir), include_defaults=False))
    for t in ("qs_arc_mc", "qs_arc_mc0"):
        assert len(list(ctx.store.items("m", t))) == 12
        assert got[f"eval.{t}.acc"] == pytest.approx(ref["results"][t]["acc,none"])
    assert got["eval.qs_group.acc"] == pytest.approx(ref["results"]["qs_group"]["acc,none"])
    # under an alias the group's aggregate is stored under the alias, not the group's own name (which a
    # built-in task of that name would otherwise share), and the report's group table reads it there
    actx = study(tmp_path / "aliased", [{"lmeval": "qs_group", "include_path": str(gdir), "limit": 12,
                                         "alias": "lm_grp"}])
    run_stage(actx, "evaluate", ModelRecord(name="m", role="baseline", path=str(tiny)))
    agot = {n: (v, i) for _, n, v, i in actx.store.metrics("m")}
    assert agot["eval.lm_grp.acc"][0] == pytest.approx(ref["results"]["qs_group"]["acc,none"])
    assert agot["eval.lm_grp.acc"][1]["group"] == "lm_grp" and "eval.qs_group.acc" not in agot


# ------------------------------------------------------------------ refusals, names, offline
def test_function_in_user_yaml_refused_without_trust(tmp_path: Path, shared_data: Path, tiny: Path) -> None:
    from quantstudy.tasks.lmeval_load import plan_check

    d = tmp_path / "user"
    d.mkdir()
    (d / "func.yaml").write_text(FUNC.format(d=shared_data))
    (d / "helpers.py").write_text("def doc_to_text(doc):\n    return 'Q: ' + doc['question']['stem'] + '\\nA:'\n")
    spec = LMEvalTaskSpec(lmeval="qs_func", include_path=str(d))
    with pytest.raises(QuantStudyError) as e:
        plan_check(spec, tmp_path, trust=False)
    assert "trust_task_code" in str(e.value) and "helpers.doc_to_text" in str(e.value)
    # a user YAML that includes it inherits the code: refused too
    (d / "child.yaml").write_text("include: func.yaml\ntask: qs_func_child\n")
    with pytest.raises(QuantStudyError, match="trust_task_code"):
        plan_check(LMEvalTaskSpec(lmeval="qs_func_child", include_path=str(d)), tmp_path, trust=False)
    # trusted: lm-eval imports and uses the function
    plan_check(spec, tmp_path, trust=True)
    ctx = study(tmp_path, [{"lmeval": "qs_func", "include_path": str(d), "limit": 3}], trust_task_code=True)
    run_stage(ctx, "evaluate", ModelRecord(name="m", role="baseline", path=str(tiny)))
    assert len(list(ctx.store.items("m", "qs_func"))) == 3


def test_unknown_registry_name_did_you_mean_and_offline_hub_task(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    from quantstudy.tasks.lmeval_load import plan_check

    with pytest.raises(QuantStudyError) as e:
        plan_check(LMEvalTaskSpec(lmeval="winogrand"), tmp_path, trust=False)
    assert "did you mean 'winogrande'" in str(e.value)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("quantstudy.tasks.lmeval_load.in_cache", lambda path: False)
    with pytest.raises(QuantStudyError) as e:
        plan_check(LMEvalTaskSpec(lmeval="winogrande"), tmp_path, trust=False)
    assert "allenai/winogrande" in str(e.value) and "data_files" in str(e.value)


def test_new_fields_keep_existing_stage_keys() -> None:
    base = {"name": "t", "model": {"source": "x"}, "evaluate": {"tasks": ["arc_easy", {"name": "gsm8k", "limit": 5}]}}
    cfg = parse_config(base)
    text = str(cfg.evaluate)
    assert "trust_task_code" not in text and "LMEval" not in text  # the hashed text of an old study is unchanged
    assert str(parse_config({**base, "evaluate": {**base["evaluate"], "trust_task_code": False}}).evaluate) == text
    assert "trust_task_code=True" in str(parse_config({**base, "evaluate": {**base["evaluate"],
                                                                            "trust_task_code": True}}).evaluate)
    with pytest.raises(QuantStudyError, match="did you mean `limit`"):
        parse_config({**base, "evaluate": {"tasks": [{"lmeval": "winogrande", "limt": 3}]}})


# ------------------------------------------------------------------ slow: SmolLM2-135M
@pytest.mark.slow
@pytest.mark.parametrize("kind,name,limit", [("mc", "qs_arc_mc", 300), ("gen", "qs_gsm_gen", 60),
                                             ("roll", "qs_wiki_roll", 300)])
def test_yaml_task_agrees_with_lm_eval_smollm2(kind: str, name: str, limit: int, tmp_path: Path, smollm2_dir: Path,
                                               task_dir: Path) -> None:
    check(kind, name, tmp_path, smollm2_dir, task_dir, limit)
