"""Evaluating an lm-eval task (registry or user YAML) with quantstudy's scorers, per item, resumable.

lm-eval builds everything that gives a score its meaning: the documents, few-shot examples (its
sampler, seeded like `simple_evaluate`'s fewshot_random_seed), the prompts (`build_all_requests`,
with the chat template when asked), filters, `process_results`, aggregation and group aggregates.
quantstudy answers the requests in between, the way lm-eval's `evaluate()` hands them to an LM:
  loglikelihood          -> Scorer.loglikelihood (prefix-sharing backend, or lm-eval's HFLM)
  loglikelihood_rolling  -> Scorer.loglikelihood_rolling
  generate_until         -> Scorer.generate with the request's `until` and `max_gen_toks` (greedy)
Documents are scored in chunks, each chunk filtered, scored by `process_results` and written to the
store as one transaction, so a killed run keeps what it scored and a re-run skips it.

Per item: `correct` holds the task's first metric when its per-item values are 0/1 (acc,
exact_match), else `score` holds it (f1, ...); every per-item metric value is in details.metrics.
Metrics whose `process_results` values are not per-item numbers (pairs for a corpus-level
aggregation: perplexities, BLEU, SQuAD v2's HF metric) are kept per item in details.corpus and
aggregated by lm-eval's own function over all items. For the perplexities the per-item value is
exact (the NLL of the document and its word count, as the built-in WikiText stores), so paired
tests work; for the others no per-item value is reported.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from quantstudy.records import ItemBatch, Metric, Metrics, Note, Record
from quantstudy.data.chat import Think, kwargs_tag, merged_kwargs, render
from quantstudy.config import LimitMode, LMEvalTaskSpec
from quantstudy.errors import QuantStudyError
from quantstudy.runtime.faults import failpoint
from quantstudy.scoring.protocol import GenRequest, LLRequest, Scorer
from quantstudy.tasks.base import sha
from quantstudy.tasks.lmeval_load import hub_reachable, offline_fix, resolve, task_manager
from quantstudy.tasks.lmeval_results import aggregate, as_number, records

CHUNK_DOCS = {"loglikelihood": 128, "generate_until": 16, "loglikelihood_rolling": 16}  # docs per scorer call


def load_tasks(spec: LMEvalTaskSpec, config_dir: Path, trust: bool, seed: int) -> dict[str, Any]:
    """lm-eval's TaskDict for the entry, with the overrides simple_evaluate applies (num_fewshot, seed)."""
    r = resolve(spec, config_dir, trust)
    if not hub_reachable():  # cached hub data: let datasets read its cache without asking the hub
        import datasets.config
        import huggingface_hub.constants

        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        loaded = task_manager(r.include, r.defaults).load([spec.lmeval])
    except QuantStudyError:
        raise
    except Exception as e:  # data missing, a YAML error, a !function that fails to import
        raise QuantStudyError(f"lm-eval could not build task {spec.lmeval} ({type(e).__name__}: {str(e)[:300]})",
                              field="evaluate.tasks.lmeval", value=spec.lmeval, fix=offline_fix(r)) from None
    for task in loaded["tasks"].values():
        # simple_evaluate's rules: a num_fewshot of 0 in the task config is never overridden
        if spec.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        if spec.max_new_tokens is not None and task.get_config("output_type") == "generate_until":
            task.set_config(key="generation_kwargs", value={"max_gen_toks": spec.max_new_tokens}, update=True)
        task.set_fewshot_seed(seed=seed)
    return loaded


def store_key(spec: LMEvalTaskSpec, leaf: str, loaded: dict[str, Any], taken: set[str] = frozenset()) -> str:
    """Name items are stored under: the entry's key for a single task, the leaf name inside a group
    (prefixed with the entry's key under an alias, or when another entry of the study has that name,
    e.g. a group's registry gsm8k beside the built-in gsm8k: their items must not mix)."""
    if len(loaded["tasks"]) == 1 and not loaded.get("groups"):
        return spec.key
    return scoped(spec, leaf, taken)


def scoped(spec: LMEvalTaskSpec, name: str, taken: set[str]) -> str:
    """A name inside an entry (a group's subtask or the group itself): prefixed with the entry's key under
    an alias or when another entry of the study has that name."""
    return f"{spec.key}.{name}" if spec.alias or name in taken else name


def select(task: Any, spec: LMEvalTaskSpec, mode: LimitMode, seed: int) -> list[int]:
    """Document indices: lm-eval's --limit (the first N), or N drawn with the evaluation seed."""
    n = len(task.eval_docs)  # lm-eval's evaluation split: test, else validation
    if spec.limit is None or spec.limit >= n:
        return list(range(n))
    if mode is LimitMode.first:
        return list(range(spec.limit))
    rnd = random.Random(f"{seed}:{task.task_name}")
    return sorted(rnd.sample(range(n), spec.limit))


def chat_fn(tokenizer: Any, kwargs: dict[str, Any]) -> Any:
    """HFLM.apply_chat_template: the tokenizer's template, continuing the last message when no
    generation prompt is asked for (lm-eval's gen_prefix)."""
    return lambda hist, add_generation_prompt=True: render(
        tokenizer, hist, {**kwargs, "continue_final_message": not add_generation_prompt}, add_generation_prompt)


def build(task: Any, indices: list[int], chat: Any) -> dict[int, list[Any]]:
    """doc index -> its Instances (in request order), built by lm-eval for exactly these documents in
    this order (the few-shot sampler draws in document order, as in an lm-eval run)."""
    if indices == list(range(len(indices))):
        task.build_all_requests(limit=len(indices), apply_chat_template=chat is not None, chat_template=chat)
        true = indices
    else:
        task.build_all_requests(samples=indices, apply_chat_template=chat is not None, chat_template=chat)
        true = indices  # lm-eval numbers the sampled documents 0..k-1 in index order
    by: dict[int, list[Any]] = defaultdict(list)
    for inst in task.instances:
        by[true[inst.doc_id]].append(inst)
    for insts in by.values():
        insts.sort(key=lambda i: i.idx)
        if any(i.repeats != 1 for i in insts):
            raise QuantStudyError(f"lm-eval task {task.task_name}: repeats > 1 (sampled generation) is not supported",
                                  field="evaluate.tasks", value=task.task_name, fix="use a greedy task config")
    return by


def prompt_hash(insts: list[Any], tag: str) -> str:
    return sha(json.dumps([list(i.args) for i in insts], default=str, sort_keys=True) + ("\x00" + tag if tag else ""))


def answer(insts: list[Any], scorer: Scorer, think: tuple[str, str | None]) -> dict[int, Any]:
    """Responses for a chunk's instances in lm-eval's shapes: (logprob, is_greedy), logprob, or text.
    Returns id(instance) -> generation facts for generate_until requests."""
    gen_info: dict[int, Any] = {}
    by_type: dict[str, list[Any]] = defaultdict(list)
    for i in insts:
        by_type[i.request_type].append(i)
    if by_type["loglikelihood"]:
        res = scorer.loglikelihood([LLRequest(*i.args) for i in by_type["loglikelihood"]])
        for i, r in zip(by_type["loglikelihood"], res):
            i.resps = [(r.logprob, r.is_greedy)]
    if by_type["loglikelihood_rolling"]:
        res = scorer.loglikelihood_rolling([i.args[0] for i in by_type["loglikelihood_rolling"]])
        for i, r in zip(by_type["loglikelihood_rolling"], res):
            i.resps, gen_info[id(i)] = [r.logprob], r
    if by_type["generate_until"]:
        reqs = []
        for i in by_type["generate_until"]:
            ctx, kw = i.args[0], dict(i.args[1])
            until = kw.get("until") or []
            until = tuple([until] if isinstance(until, str) else until)
            reqs.append(GenRequest(ctx, until, int(kw.get("max_gen_toks", 256)), Think.for_prompt(*think, ctx)))
        for i, g in zip(by_type["generate_until"], scorer.generate(reqs)):
            i.resps, gen_info[id(i)] = [g.text], g
    return gen_info


def evaluate_entry(ctx: Any, lazy: Any, spec: LMEvalTaskSpec, progress: Any, model_name: str) -> Iterator[Record]:
    """Score one lm-eval entry (a task or a group) for one model; yields item batches and metrics."""
    ecfg = ctx.cfg.evaluate
    loaded = load_tasks(spec, ctx.config_dir, ecfg.trust_task_code, ecfg.seed)
    kwargs = merged_kwargs(ctx.cfg.model.chat_template_kwargs, spec.chat_template_kwargs) if spec.chat_template else {}
    chat = chat_fn(lazy.tokenizer(), kwargs) if spec.chat_template else None
    leaf_metrics: dict[str, dict[str, Any]] = {}
    taken = {t.key for t in ecfg.task_specs()} | {t.key for t in ecfg.lmeval_specs() if t.key != spec.key}
    for leaf, task in loaded["tasks"].items():
        key = store_key(spec, leaf, loaded, taken)
        indices = select(task, spec, ecfg.limit_mode, ecfg.seed)
        by = build(task, indices, chat)
        tag = kwargs_tag(kwargs)
        hashes = {d: prompt_hash(by[d], tag) for d in indices}
        have = dict(ctx.stored.get(key, {}))
        todo = [d for d in indices if not (have.get(str(d)) and have[str(d)].prompt_hash == hashes[d])]
        bar = progress.add_task(f"{model_name} · {key}", total=len(indices), completed=len(indices) - len(todo))
        kind = task.get_config("output_type")
        step = CHUNK_DOCS.get("loglikelihood" if kind == "multiple_choice" else kind, 16)
        scorer = lazy.scorer() if todo else None
        all_docs = task.eval_docs  # a property that may re-run process_docs: read once
        docs = {i: all_docs[i] for i in indices}
        t0 = time.perf_counter()
        for b in range(0, len(todo), step):
            chunk = {d: docs[d] for d in todo[b:b + step]}
            c0 = time.perf_counter()
            info = answer([i for d in chunk for i in by[d]], scorer, (ctx.cfg.model.think_start_token,
                                                                      ctx.cfg.model.think_end_token))
            recs = records(task, key, chunk, by, hashes, info, scorer.name)
            per = (time.perf_counter() - c0) / max(1, len(recs))
            for r in recs:
                r.latency_s = r.latency_s if r.latency_s is not None else per
            yield ItemBatch(model_name, recs)
            failpoint("evaluate-mid")
            have.update((r.item_id, r) for r in recs)
            progress.advance(bar, len(chunk))
        if todo:
            yield Metrics(model_name, [Metric(f"time.eval.{key}", time.perf_counter() - t0,
                                              {"items_scored": len(todo), "items": len(indices)})])
        recs = [have[str(d)] for d in indices]
        failed: dict[str, str] = {}
        values = aggregate(task, recs, failed)
        if failed:
            yield Note(f"  {key}: lm-eval could not aggregate {', '.join(failed)} here "
                       f"({next(iter(failed.values()))}); per-item values are stored")
        leaf_metrics[leaf] = {**{k if "," in k else f"{k},none": v for k, v in values.items()}, "sample_len": len(recs)}
        info = {"n": len(recs), "limit": spec.limit, "limit_mode": ecfg.limit_mode.value, "seed": ecfg.seed,
                "num_fewshot": task.get_config("num_fewshot"), "chat_template": bool(chat),
                "backend": sorted({str(r.details.get("backend")) for r in recs}), "lmeval": spec.lmeval,
                "data": str(task.get_config("dataset_path")), "higher_is_better": task.higher_is_better(),
                "not_aggregated": failed}  # lm-eval aggregations that failed here, with their errors
        yield Metrics(model_name, [Metric(f"eval.{key}.{name}", v, info) for name, v in values.items()])
    for gname, group in (loaded.get("groups") or {}).items():  # lm-eval's own group aggregate
        # stored like a leaf: under the entry's key when aliased or when another entry has the name
        # (a group `mmlu` beside the built-in mmlu must not overwrite eval.mmlu.acc)
        gkey = spec.key if gname == spec.lmeval and spec.alias else scoped(spec, gname, taken)
        res = group.aggregate(leaf_metrics)
        info = {"group": gkey, "lmeval_group": gname, "subtasks": loaded["group_map"].get(gname, []),
                "n": res.get("sample_len"), "lmeval": spec.lmeval}
        yield Metrics(model_name, [Metric(f"eval.{gkey}.{name.removesuffix(',none')}", float(v), info)
                                   for name, v in res.items()
                                   if not ("_stderr," in name or as_number(v) is None or name == "sample_len")])
