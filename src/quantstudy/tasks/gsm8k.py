"""GSM8K, as lm-eval's gsm8k.yaml: 5-shot from train (seeded random sampler), test split.

"Question: ..\\nAnswer:" + greedy generation until "Question:", "</s>", "<|im_end|>" (and EOS).
Both of lm-eval's filters are applied with lm-eval's own RegexFilter and exact_match:
  strict-match      "#### (-?[0-9.,]+)", first match
  flexible-extract  "(-?[$0-9.,]{2,})|(-?[0-9]+)", last match
then exact match after removing ",", "$", everything up to "#### " and a final ".", ignoring
case. `correct` is strict-match (the number after "####", the answer format the few-shot
examples teach, lm-eval's first filter); flexible-extract is kept in details and as its own
metric, so a variant that loses the format but keeps the arithmetic is visible.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.metrics import exact_match_hf_evaluate
from lm_eval.filters.extraction import RegexFilter

from quantstudy.config import TaskName
from quantstudy.scoring.protocol import GenResult
from quantstudy.store import ItemRecord
from quantstudy.tasks.base import Doc, Item, Kind, Task, hub_rows, need_file, read_jsonl

STRICT = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)", group_select=0)
FLEXIBLE = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]  # gsm8k.yaml metric_list regexes_to_ignore


def extract(text: str) -> tuple[str, str]:
    """(strict, flexible) answers, "[invalid]" when nothing matches (lm-eval's fallback)."""
    return STRICT.apply([[text]], [{}])[0][0], FLEXIBLE.apply([[text]], [{}])[0][0]


def matches(extracted: str, reference: str) -> bool:
    return bool(exact_match_hf_evaluate([extracted], [reference], regexes_to_ignore=IGNORE,
                                        ignore_case=True, ignore_punctuation=False)["exact_match"])


class GSM8KTask(Task):
    name = TaskName.gsm8k
    kind = Kind.generate
    primary_metric = "em"
    default_fewshot = 5
    hub = "openai/gsm8k"
    until = ("Question:", "</s>", "<|im_end|>")

    def docs(self, data_dir: Path | None, split: str) -> list[Doc]:
        if data_dir is None:
            return hub_rows(self.name.value, self.hub, "main", split)
        path = need_file(self.name.value, data_dir / "gsm8k" / f"{split}.jsonl", f"{self.hub} (main)")
        return [{"question": r["question"], "answer": r["answer"]}
                for r in read_jsonl(self.name.value, path, ("question", "answer"))]

    def eval_items(self, data_dir: Path | None) -> list[Item]:
        return [Item(f"test/{i}", d, d["question"]) for i, d in enumerate(self.docs(data_dir, "test"))]

    def fewshot_docs(self, data_dir: Path | None) -> dict[str, list[Doc]]:
        return {"": self.docs(data_dir, "train")}

    def doc_to_text(self, doc: Doc) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc: Doc) -> str:
        return doc["answer"]

    def gold(self, doc: Doc) -> str:
        return doc["answer"].split("####")[-1].strip()

    def score_generation(self, item: Item, gen: GenResult) -> ItemRecord:
        strict, flexible = extract(gen.text)
        ok_strict, ok_flex = matches(strict, item.doc["answer"]), matches(flexible, item.doc["answer"])
        return ItemRecord(task=self.name.value, item_id=item.id, item_hash=item.hash, prompt_hash="",
                          gold=self.gold(item.doc), prediction=strict, correct=ok_strict,
                          details={"text": gen.text, "strict": strict, "flexible": flexible,
                                   "correct_flexible": ok_flex})

    def aggregate(self, records: list[ItemRecord]) -> dict[str, float]:
        n = len(records)
        strict = sum(bool(r.correct) for r in records) / n
        return {"acc": strict, "em": strict, "em_strict": strict,
                "em_flexible": sum(bool(r.details["correct_flexible"]) for r in records) / n, "n": n}
