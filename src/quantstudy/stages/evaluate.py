"""Evaluation stage: score one model on every configured task, per item, resumable.

For each task: select the items (same for every model of the study: first N, or a sample
drawn with the evaluation seed), build lm-eval-style prompts (few-shot drawn with the same
seeded sampler as lm-eval), skip items the store already holds with the same prompt, score
the rest in batches through a `Scorer` and yield each batch as a record (the driver writes it
in one transaction, so a killed run keeps what it scored). Aggregates are computed over the
selected items, stored and new.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from quantstudy import store as st
from quantstudy.config import EvalBackend, StudyConfig, TaskSpec
from quantstudy.records import ItemBatch, Metric, Metrics, Record
from quantstudy.errors import QuantStudyError
from quantstudy.scoring.protocol import GenRequest, LLRequest, Scorer
from quantstudy.tasks import Item, Kind, Task, build_context, continuation_prefix, get_task, pick_fewshot
from quantstudy.data.chat import Think, kwargs_tag, merged_kwargs, render
from quantstudy.tasks.base import ChatFn, reasoning_stats, sha
from quantstudy.tasks.selection import select_items
from quantstudy.runtime.faults import failpoint
from quantstudy.stages.protocol import Job, StageName


@dataclass(frozen=True)
class Prompt:
    item: Item
    context: str  # exact text sent to the model (rolling tasks: the text scored)
    tag: str = ""  # settings that change the result but may not show in the text (chat template kwargs)

    @property
    def hash(self) -> str:
        return sha(self.context + "\x00" + self.tag) if self.tag else sha(self.context)


def make_scorer(ctx: Job, model: Any, tokenizer: Any) -> Scorer:
    bs = ctx.cfg.evaluate.batch_size if ctx.cfg.evaluate else 16
    if ctx.cfg.evaluate is None or ctx.cfg.evaluate.backend is EvalBackend.fast:
        try:
            from quantstudy.scoring.fastscore import FastScorer
        except ImportError:
            logging.getLogger(__name__).warning("quantstudy.scoring.fastscore is not available; scoring with lm-eval's HFLM")
        else:
            return FastScorer(model, tokenizer, batch_size=bs, device=ctx.device)
    from quantstudy.scoring.lmeval_backend import LMEvalScorer

    return LMEvalScorer(model, tokenizer, batch_size=bs, device=ctx.device)


def chat_fn(tokenizer: Any, kwargs: dict[str, Any] | None = None) -> ChatFn:
    if not getattr(tokenizer, "chat_template", None):
        raise QuantStudyError("the model's tokenizer has no chat template", field="evaluate.chat_template",
                              value=True, fix="set evaluate.chat_template: false (and no task's chat_template: true) for this model")
    return lambda msgs: render(tokenizer, msgs, kwargs)


def think_tag(ctx: Job, task: Task) -> str:
    """Reasoning markers in the prompt hash of generative tasks, only when they differ from the
    defaults (so results stored before they existed stay fresh)."""
    changed = ctx.cfg.model.think_markers_changed()
    if task.kind is not Kind.generate or changed is None:
        return ""
    return f"think={changed[0]}|{changed[1]}"


def build_prompts(task: Task, items: list[Item], data_dir: Path | None, num_fewshot: int | None, seed: int,
                  chat: ChatFn | None, tag: str = "") -> list[Prompt]:
    if task.kind is Kind.rolling:  # perplexity: no prompt, no few-shot, no chat template
        return [Prompt(it, task.rolling_text(it.doc)) for it in items]
    k = task.default_fewshot if num_fewshot is None else num_fewshot
    pools = task.fewshot_docs(data_dir) if k > 0 else {}
    shots = pick_fewshot(task, items, pools, k, seed)
    return [Prompt(it, build_context(task, it.doc, s, chat), tag) for it, s in zip(items, shots)]


def score_prompts(task: Task, prompts: list[Prompt], scorer: Scorer, max_new_tokens: int,
                  chat: bool, think: tuple[str, str | None] = ("<think>", "</think>"),
                  key: str | None = None) -> list[st.ItemRecord]:
    """Score one batch of prompts; latency = batch wall time / items. Generation: the scorer's own
    per-request figure (fast backend: the request's share of each forward pass it took part in, a
    step's time split over the rows in it, so the latencies of a call add up to its compute time,
    whatever the batch; lm-eval backend: batch time / rows).

    Generative tasks score the answer after a reasoning block (`think`: start and end markers,
    end None = no extraction); the block's text and token count go into the item's details.
    `key` is the name the records are stored under (a task's alias), default the task's name."""
    t0 = time.perf_counter()
    if task.kind is Kind.multiple_choice:
        sep = continuation_prefix(task, chat)
        reqs = [[LLRequest(p.context, sep + c) for c in task.doc_to_choice(p.item.doc)] for p in prompts]
        flat = scorer.loglikelihood([r for rs in reqs for r in rs])
        recs, i = [], 0
        for p, rs in zip(prompts, reqs):
            recs.append(task.score_choices(p.item, flat[i:i + len(rs)]))
            i += len(rs)
    elif task.kind is Kind.generate:
        gens = scorer.generate([GenRequest(p.context, task.until, max_new_tokens, Think.for_prompt(*think, p.context))
                                for p in prompts])
        recs = []
        for p, g in zip(prompts, gens):
            r = task.score_generation(p.item, g)  # g.text: the answer after any reasoning block
            r.n_tokens, r.hit_max, r.latency_s = g.n_tokens, g.hit_max, g.latency_s
            r.details["max_new_tokens"] = max_new_tokens
            if g.reasoning is not None:
                r.details.update(reasoning=g.reasoning, reasoning_tokens=g.reasoning_tokens,
                                 reasoning_closed=g.reasoning_closed,
                                 reasoning_hit_max=bool(g.hit_max and not g.reasoning_closed))
            recs.append(r)
    else:
        recs = [task.score_rolling(p.item, r) for p, r in
                zip(prompts, scorer.loglikelihood_rolling([p.context for p in prompts]))]
    per_item = (time.perf_counter() - t0) / max(1, len(prompts))
    for p, r in zip(prompts, recs):
        r.prompt_hash = p.hash
        if key and key != r.task:  # a task evaluated under an alias: stored under it, the task kept in details
            r.task, r.details["task_name"] = key, r.task
        r.details["backend"] = scorer.name
        if r.latency_s is None:
            r.latency_s = per_item
    return recs


def items_per_call(kind: Kind, batch_size: int) -> int:
    """Items per scorer call, which is also how often scored items are written to the store.
    Perplexity: one document (its windows are the batch). Multiple choice: 8 batches' worth,
    because the prefix-sharing scorer bin-packs the questions of one call into rows, and more
    questions pack tighter (HellaSwag, SmolLM2 tokens: 8.9% padding at 16 items per call, 2.4% at
    128); a kill loses at most one call (~20 s on a 2-core CPU). Generation: 8 batches' worth too,
    because a call is one continuous batch: finished rows take the next request, so only the
    call's last requests run in a shrinking batch (a kill loses at most one call, ~1-2 min)."""
    if kind is Kind.rolling:
        return 1
    return batch_size * 8


def _fresh(rec: st.ItemRecord | None, p: Prompt, task: Task, max_new: int) -> bool:
    return rec is not None and rec.prompt_hash == p.hash and (
        task.kind is not Kind.generate or rec.details.get("max_new_tokens") == max_new)


class _Model:
    """Loads the model only when some item actually needs scoring (a finished run loads nothing)."""

    def __init__(self, ctx: Job, rec: st.ModelRecord):
        self.ctx, self.rec, self._scorer, self._tok = ctx, rec, None, None
        self.loaded: Metrics | None = None  # what loading found out, for the driver to store

    def tokenizer(self) -> Any:
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.rec.path,
                                                      trust_remote_code=self.ctx.cfg.model.trust_remote_code)
        return self._tok

    def scorer(self) -> Scorer:
        if self._scorer is None:
            from quantstudy.runtime.modeldir import load_pretrained

            cfg = self.ctx.cfg.model
            model, self._tok = load_pretrained(Path(self.rec.path), device=self.ctx.device, dtype=cfg.dtype.value,
                                               trust_remote_code=cfg.trust_remote_code)
            from quantstudy.config.schemes import prepare_loaded

            # what the scored model does to its activations, read off the loaded modules (#22)
            handling = prepare_loaded(model)
            self.loaded = Metrics(self.rec.name, [Metric("activations.evaluate",
                                                         float(handling["activations_quantized"]), handling)])
            self._scorer = make_scorer(self.ctx, model, self._tok)
        return self._scorer


def evaluate_model(ctx: Job) -> Iterator[Record]:
    """Score `ctx.model` on every configured task; yields item batches, then each task's metrics."""
    ecfg, model = ctx.cfg.evaluate, ctx.model
    if ecfg is None:
        return
    lazy, progress = _Model(ctx, model), ctx.progress
    for spec in ecfg.task_specs():
        if ctx.tasks is not None and spec.key not in ctx.tasks:  # another task's share of the model's work
            continue
        task = get_task(spec.name)
        items = select_items(spec, ecfg, ctx.data_dir)
        use_chat = bool(spec.chat_template) and task.kind is not Kind.rolling
        kwargs = merged_kwargs(ctx.cfg.model.chat_template_kwargs, spec.chat_template_kwargs) if use_chat else {}
        chat = chat_fn(lazy.tokenizer(), kwargs) if use_chat else None
        tag = "\x00".join(t for t in (kwargs_tag(kwargs), think_tag(ctx, task)) if t)
        prompts = build_prompts(task, items, ctx.data_dir, spec.num_fewshot, ecfg.seed, chat, tag)
        have = dict(ctx.stored.get(spec.key, {}))
        mine = prompts
        if task.kind is not Kind.rolling:  # questions with shared prompt prefixes share a call, so the prefix
            mine = sorted(prompts, key=lambda p: p.context)  # is computed once (MMLU 5-shot: 27% fewer tokens)
        mine = shard_of(mine, ctx.shard)  # a contiguous run of that order: a part keeps its prefixes' sharing
        todo = [p for p in mine if not _fresh(have.get(p.item.id), p, task, ecfg.max_new_tokens)]
        label = f"{model.name} · {spec.key}" + (f" {ctx.shard[0] + 1}/{ctx.shard[1]}" if ctx.shard else "")
        bar = progress.add_task(label, total=len(mine), completed=len(mine) - len(todo))
        step = items_per_call(task.kind, ecfg.batch_size)
        scorer = lazy.scorer() if todo else None  # loaded before the clock starts: load time is not task time
        if lazy.loaded is not None:
            yield lazy.loaded
            lazy.loaded = None
        t0 = time.perf_counter()
        for b in range(0, len(todo), step):
            chunk = todo[b:b + step]
            recs = score_prompts(task, chunk, scorer, ecfg.max_new_tokens, chat is not None,
                                 (ctx.cfg.model.think_start_token, ctx.cfg.model.think_end_token), spec.key)
            yield ItemBatch(model.name, recs)
            failpoint("evaluate-mid")  # tests kill here: the batch is stored, the rest is not
            have.update((r.item_id, r) for r in recs)
            progress.advance(bar, len(chunk))
        timing = []
        if todo:  # wall time of this run's scoring (s); a resumed run times only what it scored
            timing = [Metric(f"time.eval.{spec.key}", time.perf_counter() - t0,
                             {"items_scored": len(todo), "items": len(prompts)})]
        if ctx.shard is not None:  # a part: its items are stored; the task's figures come once all parts are
            if timing:
                yield Metrics(model.name, timing)
            continue
        yield Metrics(model.name, timing + task_metrics(ctx, task, spec, [have[p.item.id] for p in prompts]))
    for lspec in ecfg.lmeval_specs():  # lm-eval registry / user YAML tasks (#20)
        if ctx.tasks is not None and lspec.key not in ctx.tasks:
            continue
        from quantstudy.tasks.lmeval_tasks import evaluate_entry

        yield from evaluate_entry(ctx, lazy, lspec, progress, model.name)
        if lazy.loaded is not None:
            yield lazy.loaded
            lazy.loaded = None


def shard_of(prompts: list[Prompt], shard: tuple[int, int] | None) -> list[Prompt]:
    """Part i of n: the i-th of n contiguous, near-equal runs of `prompts` (all of them for None)."""
    if shard is None:
        return prompts
    i, n = shard
    return prompts[len(prompts) * i // n:len(prompts) * (i + 1) // n]


def task_metrics(ctx: Job, task: Task, spec: TaskSpec, records: list[st.ItemRecord]) -> list[Metric]:
    ecfg = ctx.cfg.evaluate
    k = task.default_fewshot if spec.num_fewshot is None else spec.num_fewshot
    info = {"n": len(records), "limit": spec.limit, "limit_mode": ecfg.limit_mode.value, "seed": ecfg.seed,
            "num_fewshot": 0 if task.kind is Kind.rolling else k, "chat_template": bool(spec.chat_template) and task.kind is not Kind.rolling,
            "backend": sorted({str(r.details.get("backend")) for r in records}),
            "data": f"offline:{ctx.data_dir}" if ctx.data_dir else f"hub:{task.hub}"}
    if info["chat_template"]:
        info["chat_template_kwargs"] = merged_kwargs(ctx.cfg.model.chat_template_kwargs, spec.chat_template_kwargs)
    if spec.key != task.name.value:
        info["task"] = task.name.value
    values = task.aggregate(records)
    if task.kind is Kind.generate:
        values.update(reasoning_stats(records))
    return [Metric(f"eval.{spec.key}.{name}", float(value), info) for name, value in values.items()]


class Stage:
    """Evaluate: the key hashes what changes a score (tasks, limits, seeds, batch size, backend,
    generation length), not the speed settings, which only the measure stage reads."""

    name = StageName.evaluate

    def key_inputs(self, cfg: StudyConfig) -> tuple[object, ...]:
        return (cfg.evaluate.model_copy(update={"speed": None}),) if cfg.evaluate else ()

    def run(self, job: Job) -> Iterator[Record]:
        return evaluate_model(job)
