"""What a benchmark task is: data readers, lm-eval's prompt rules, per-item scoring, aggregates.

A task is data in the lm-eval sense: `doc_to_text`, `doc_to_target`, `doc_to_choice`, a
description, a few-shot split and a sampler. Prompts are assembled exactly the way
lm-evaluation-harness 0.4.13 assembles them (`ConfigurableTask.fewshot_context` +
`build_qa_turn`, see `build_context`), so a score here means what the same score means in
a model card. Subclasses only say where the documents come from and how an answer is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from quantstudy.config import TaskName
from quantstudy.errors import QuantStudyError
from quantstudy.scoring.protocol import GenResult, LLResult, RollingResult
from quantstudy.store import ItemRecord

Doc = dict[str, Any]
ChatFn = Callable[[list[dict[str, str]]], str]  # messages -> prompt text (tokenizer chat template)


class Kind(str, Enum):
    multiple_choice = "multiple_choice"  # lm-eval output_type multiple_choice (loglikelihood per choice)
    generate = "generate_until"
    rolling = "loglikelihood_rolling"


class Sampler(str, Enum):
    random = "default"  # lm-eval ContextSampler: rnd.sample(pool, n), one RNG per task, seeded
    first_n = "first_n"  # lm-eval FirstNSampler (MMLU): the first n documents of the split


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Item:
    """One evaluation document. `id` is stable across runs (dataset id or file position)."""

    id: str
    doc: Doc
    question: str  # the text a training set must not contain (held-out guard)

    @property
    def hash(self) -> str:  # content of the whole item: question, choices, gold
        return sha(json.dumps(self.doc, sort_keys=True, ensure_ascii=False))


# ------------------------------------------------------------------ readers
def need_file(task: str, path: Path, hub: str) -> Path:
    if not path.is_file():
        raise QuantStudyError(f"{task}: data file not found", field="data_dir", value=str(path),
                              fix=f"put the file there (the layout of ../shared/data, see its SOURCES.md), "
                                  f"or drop data_dir/--data-dir to load {hub} from the Hugging Face hub")
    return path


def bad_format(task: str, path: Path, what: str) -> QuantStudyError:
    return QuantStudyError(f"{task}: {path} is not in the expected format: {what}", field="data_dir",
                           value=str(path), fix="replace it with the original file (see ../shared/data/SOURCES.md)")


def read_jsonl(task: str, path: Path, keys: tuple[str, ...]) -> list[Doc]:
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise bad_format(task, path, f"not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise bad_format(task, path, f"line {n} is not JSON") from None
        if not isinstance(row, dict) or not all(k in row for k in keys):
            raise bad_format(task, path, f"line {n} lacks one of the keys {list(keys)}")
        out.append(row)
    if not out:
        raise bad_format(task, path, "no records")
    return out


def hub_rows(task: str, path: str, name: str | None, split: str) -> list[Doc]:
    """The real online path: the same dataset ids lm-eval 0.4.13 uses."""
    import datasets

    try:
        return [dict(r) for r in datasets.load_dataset(path, name, split=split)]
    except Exception as e:  # no network, gated repo, renamed split: say which and how to go offline
        raise QuantStudyError(f"{task}: could not load {path}{'/' + name if name else ''} split {split} "
                              f"from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]})",
                              fix="check the network, or set data_dir / --data-dir to an offline copy "
                                  "(the layout of ../shared/data)") from None


# ------------------------------------------------------------------ the task
class Task:
    name: TaskName
    kind: Kind = Kind.multiple_choice
    default_fewshot = 0  # lm-eval's default num_fewshot for the task
    sampler = Sampler.random
    fewshot_from_eval = False  # few-shot pool is the eval split: drop the item itself (lm-eval rule)
    target_delimiter = " "
    fewshot_delimiter = "\n\n"
    until: tuple[str, ...] = ()  # stop strings for generative tasks (the scorer adds EOS)
    hub = ""  # dataset id, for error messages
    # What the report tests, declared here as lm-eval's metric_list does: the per-item right/wrong
    # metric (lm-eval's acc for multiple choice, exact match otherwise), the per-item continuous one
    # if the task scores items on a scale (SQuAD's F1), and the direction of the primary metric.
    primary_metric = "acc"
    score_metric: str | None = None
    higher_is_better = True

    # --- documents
    def eval_items(self, data_dir: Path | None) -> list[Item]:
        raise NotImplementedError

    def fewshot_docs(self, data_dir: Path | None) -> dict[str, list[Doc]]:
        """Few-shot pools keyed by `fewshot_group(doc)`; raises if the split is not available."""
        where = "in the offline data (it holds no few-shot split)" if data_dir else "for this task"
        raise QuantStudyError(f"{self.name.value}: few-shot examples are not available {where}",
                              field="evaluate.num_fewshot", fix=f"set num_fewshot: 0 for {self.name.value}")

    def fewshot_group(self, doc: Doc) -> str:
        return ""

    # --- prompt pieces (lm-eval's doc_to_* functions)
    def description(self, doc: Doc) -> str:
        return ""

    def doc_to_text(self, doc: Doc) -> str:
        raise NotImplementedError

    def doc_to_choice(self, doc: Doc) -> list[str]:
        raise NotImplementedError

    def gold(self, doc: Doc) -> Any:
        """Gold choice index (multiple choice) or gold answer string."""
        raise NotImplementedError

    def doc_to_target(self, doc: Doc) -> str:
        """The answer text shown after a few-shot example."""
        return self.doc_to_choice(doc)[self.gold(doc)]

    # --- scoring
    def score_choices(self, item: Item, lls: list[LLResult]) -> ItemRecord:
        """acc = argmax loglikelihood; acc_norm = argmax loglikelihood / characters of the choice
        (lm-eval's acc_norm: completion_len = len(choice), without the target delimiter)."""
        choices, gold = self.doc_to_choice(item.doc), int(self.gold(item.doc))
        ll = [r.logprob for r in lls]
        lengths = [len(c) for c in choices]
        pred = max(range(len(ll)), key=lambda i: (ll[i], -i))  # first max, like np.argmax
        norm = [v / n if n else -math.inf for v, n in zip(ll, lengths)]
        pred_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
        return ItemRecord(task=self.name.value, item_id=item.id, item_hash=item.hash, prompt_hash="",
                          gold=str(gold), prediction=str(pred), correct=pred == gold,
                          details={"loglikelihoods": ll, "lengths_chars": lengths, "correct_norm": pred_norm == gold,
                                   "pred_norm": pred_norm, "is_greedy": [r.is_greedy for r in lls]})

    def score_generation(self, item: Item, gen: GenResult) -> ItemRecord:
        raise NotImplementedError

    def score_rolling(self, item: Item, res: RollingResult) -> ItemRecord:
        raise NotImplementedError

    def rolling_text(self, doc: Doc) -> str:
        raise NotImplementedError

    def aggregate(self, records: list[ItemRecord]) -> dict[str, float]:
        n = len(records)
        return {"acc": sum(bool(r.correct) for r in records) / n,
                "acc_norm": sum(bool(r.details.get("correct_norm")) for r in records) / n, "n": n}


def reasoning_stats(records: list[ItemRecord]) -> dict[str, float]:
    """Reasoning blocks of a generative task: share of responses with one, mean tokens spent in
    them, and share of all responses whose reasoning was cut by max_new_tokens (no answer)."""
    n = len(records)
    think = [r for r in records if "reasoning_tokens" in r.details]
    if not n or not think:
        return {}
    return {"reasoning_share": len(think) / n,
            "reasoning_tokens_mean": sum(r.details["reasoning_tokens"] for r in think) / len(think),
            "reasoning_hit_max_share": sum(bool(r.details.get("reasoning_hit_max")) for r in think) / n}


# ------------------------------------------------------------------ prompts (lm-eval 0.4.13 rules)
def build_context(task: Task, doc: Doc, shots: list[Doc], chat: ChatFn | None) -> str:
    """lm-eval's fewshot_context: [system: description] + "q1 a1\\n\\n...q" as one user turn.

    Plain text: description + q_1 + " " + a_1 + "\\n\\n" + ... + q. With a chat template the
    description becomes the system message and the rest one user message
    (`multiturn_to_singleturn`), rendered with add_generation_prompt=True.
    """
    user = "".join(task.doc_to_text(d) + task.target_delimiter + task.doc_to_target(d) + task.fewshot_delimiter
                   for d in shots) + task.doc_to_text(doc)
    desc = task.description(doc)
    if chat is None:
        return desc + user
    return chat(([{"role": "system", "content": desc}] if desc else []) + [{"role": "user", "content": user}])


def continuation_prefix(task: Task, chat: bool) -> str:
    """lm-eval drops the target delimiter when a chat template is applied (no gen_prefix)."""
    return "" if chat else task.target_delimiter


def pick_fewshot(task: Task, items: list[Item], pools: dict[str, list[Doc]], n: int, seed: int) -> list[list[Doc]]:
    """Few-shot docs per item, drawn in item order from one RNG seeded like lm-eval's
    `set_fewshot_seed(seed)`: same seed + same items in the same order -> lm-eval's examples."""
    if n == 0:
        return [[] for _ in items]
    rnd = random.Random(seed)
    out = []
    for item in items:
        pool = pools.get(task.fewshot_group(item.doc), [])
        avail = len(pool) - (1 if task.fewshot_from_eval else 0)
        if n > avail:
            raise QuantStudyError(f"{task.name.value}: {n} few-shot examples requested, the few-shot split has "
                                  f"{avail}", field="evaluate.num_fewshot", value=n, fix=f"use at most {avail}")
        if task.sampler is Sampler.first_n:
            drop = item.doc if task.fewshot_from_eval else None
            out.append([d for d in pool if d != drop][:n])
        elif task.fewshot_from_eval:  # ContextSampler.sample with eval_doc: n + 1 drawn, the item removed
            out.append([d for d in rnd.sample(pool, n + 1) if d != item.doc][:n])
        else:
            out.append(rnd.sample(pool, n))
    return out
