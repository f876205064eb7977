"""OpenMathInstruct-2: final-answer match against `expected_answer` (not an lm-eval task).

Design (ours, since lm-eval has no such task), modelled on how OpenMathInstruct-2 and lm-eval's
MATH tasks judge answers:
  prompt   description "Solve the following math problem. Make sure to put the answer (and only
           answer) inside \\boxed{}." (the NeMo-Skills instruction the data set's solutions were
           generated with) + "Problem: ..\\nSolution:"; few-shot examples (default 0) show the
           row's `generated_solution`, drawn with the seeded lm-eval sampler from the same file
           with the evaluated item removed (lm-eval's rule when few-shot split = eval split).
  stop     "Problem:", "</s>", "<|im_end|>" (and EOS), max_new_tokens from the config.
  answer   the last \\boxed{..} of the generation (lm-eval hendrycks_math's
           last_boxed_only_string/remove_boxed); if there is none, the last number in the text.
  correct  lm-eval hendrycks_math's is_equiv (LaTeX normalisation: fractions, units, spaces,
           "\\left", trailing ".0", ...) or equal as numbers (relative 1e-6), against
           `expected_answer`.
The offline file is a 1000-row sample of the *train* split (see SOURCES.md): scores measure
answer-format + arithmetic retention under quantization, not held-out generalisation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lm_eval.tasks.hendrycks_math.utils import is_equiv, last_boxed_only_string, remove_boxed

from quantstudy.config import TaskName
from quantstudy.scoring.protocol import GenResult
from quantstudy.store import ItemRecord
from quantstudy.tasks.base import Doc, Item, Kind, Task, bad_format, hub_rows, need_file

FILE = Path("openmathinstruct-2") / "openmathinstruct-2-train.json"
KEYS = ("problem", "generated_solution", "expected_answer")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_answer(text: str) -> tuple[str | None, str]:
    """(answer, how): how is "boxed", "last_number" or "none"."""
    boxed = last_boxed_only_string(text)
    if boxed is not None:
        try:
            return remove_boxed(boxed), "boxed"
        except AssertionError:  # "\\boxed" without a closing brace
            pass
    nums = _NUMBER.findall(text)
    return (nums[-1].rstrip("."), "last_number") if nums else (None, "none")


def _number(s: str) -> float | None:
    try:
        return float(s.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def same_answer(pred: str | None, expected: str) -> bool:
    if pred is None:
        return False
    if is_equiv(pred, expected):
        return True
    a, b = _number(pred), _number(expected)
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


class OpenMathTask(Task):
    name = TaskName.openmathinstruct2
    kind = Kind.generate
    primary_metric = "em"
    fewshot_from_eval = True
    hub = "nvidia/OpenMathInstruct-2"
    until = ("Problem:", "</s>", "<|im_end|>")

    def docs(self, data_dir: Path | None) -> list[Doc]:
        if data_dir is None:
            rows = hub_rows(self.name.value, self.hub, None, "train_1M")
        else:
            path = need_file(self.name.value, data_dir / FILE, self.hub)
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise bad_format(self.name.value, path, "a JSON array of rows") from None
            if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and all(k in r for k in KEYS)
                                                                 for r in rows):
                raise bad_format(self.name.value, path, f"a JSON array of objects with {list(KEYS)}")
        return [{k: str(r[k]) for k in KEYS} for r in rows]

    def eval_items(self, data_dir: Path | None) -> list[Item]:
        return [Item(f"train/{i}", d, d["problem"]) for i, d in enumerate(self.docs(data_dir))]

    def fewshot_docs(self, data_dir: Path | None) -> dict[str, list[Doc]]:
        return {"": self.docs(data_dir)}

    def description(self, doc: Doc) -> str:
        return ("Solve the following math problem. Make sure to put the answer (and only answer) "
                "inside \\boxed{}.\n\n")

    def doc_to_text(self, doc: Doc) -> str:
        return f"Problem: {doc['problem']}\nSolution:"

    def doc_to_target(self, doc: Doc) -> str:
        return doc["generated_solution"]

    def gold(self, doc: Doc) -> str:
        return doc["expected_answer"]

    def score_generation(self, item: Item, gen: GenResult) -> ItemRecord:
        pred, how = final_answer(gen.text)
        ok = same_answer(pred, item.doc["expected_answer"])
        return ItemRecord(task=self.name.value, item_id=item.id, item_hash=item.hash, prompt_hash="",
                          gold=item.doc["expected_answer"], prediction=pred or "", correct=ok,
                          details={"text": gen.text, "extracted_by": how})

    def aggregate(self, records: list[ItemRecord]) -> dict[str, float]:
        n = len(records)
        acc = sum(bool(r.correct) for r in records) / n
        boxed = sum(r.details["extracted_by"] == "boxed" for r in records) / n
        return {"acc": acc, "em": acc, "boxed_share": boxed, "n": n}
