"""ARC-Easy / ARC-Challenge, as lm-eval's arc_easy.yaml / arc_challenge.yaml.

doc_to_text "Question: {{question}}\\nAnswer:", choices = choices.text, target =
choices.label.index(answerKey); evaluated on the test split, few-shot from train (0 by default).
Offline: the original AI2 jsonl files, `{"id", "question": {"stem", "choices": [{"text",
"label"}]}, "answerKey"}`, reshaped into the hub's `ai2_arc` columns.
"""

from __future__ import annotations

from pathlib import Path

from quantstudy.config import TaskName
from quantstudy.tasks.base import Doc, Item, Task, bad_format, hub_rows, need_file, read_jsonl

FILE_SPLIT = {"train": "Train", "validation": "Dev", "test": "Test"}


class ArcTask(Task):
    hub = "allenai/ai2_arc"

    def __init__(self, name: TaskName, subset: str, split: str = "test"):
        self.name, self.subset, self.split = name, subset, split  # subset: "ARC-Easy" | "ARC-Challenge"

    def path(self, data_dir: Path, split: str) -> Path:
        return data_dir / "arc" / self.subset / f"{self.subset}-{FILE_SPLIT[split]}.jsonl"

    def docs(self, data_dir: Path | None, split: str) -> list[Doc]:
        if data_dir is None:
            return hub_rows(self.name.value, self.hub, self.subset, split)
        path = need_file(self.name.value, self.path(data_dir, split), f"{self.hub} ({self.subset})")
        out = []
        for row in read_jsonl(self.name.value, path, ("id", "question", "answerKey")):
            q = row["question"]
            if not isinstance(q, dict) or "stem" not in q or "choices" not in q:
                raise bad_format(self.name.value, path, f"record {row['id']} has no question.stem/choices")
            out.append({"id": row["id"], "question": q["stem"],
                        "choices": {"text": [c["text"] for c in q["choices"]],
                                    "label": [c["label"] for c in q["choices"]]},
                        "answerKey": row["answerKey"]})
        return out

    def eval_items(self, data_dir: Path | None) -> list[Item]:
        return [Item(d["id"], d, d["question"]) for d in self.docs(data_dir, self.split)]

    def fewshot_docs(self, data_dir: Path | None) -> dict[str, list[Doc]]:
        return {"": self.docs(data_dir, "train")}

    def doc_to_text(self, doc: Doc) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_choice(self, doc: Doc) -> list[str]:
        return list(doc["choices"]["text"])

    def gold(self, doc: Doc) -> int:
        return list(doc["choices"]["label"]).index(doc["answerKey"])
