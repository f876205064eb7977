"""MMLU (57 subjects), as lm-eval's mmlu/default: 0-shot by default, few-shot = first n of dev.

Prompt: "The following are multiple choice questions (with answers) about <subject>.\\n\\n" +
"<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", choices " A".." D". Aggregates are
document-weighted like lm-eval's groups (`weight_by_size: True`): overall, per category
(lm-eval's grouping: stem, humanities, social_sciences, other) and per subject.

`limit` with limit_mode=first takes items round-robin over subjects (item 0 of every subject,
then item 1, ...), so `limit = 57 * k` is exactly lm-eval's `--limit k` on the mmlu group.
Offline: the original data.tar layout, headerless CSV `question,A,B,C,D,answer-letter`.
"""

from __future__ import annotations

import csv
import io
from itertools import zip_longest
from pathlib import Path

from lm_eval.tasks.mmlu._generate_configs import SUBJECTS  # lm-eval's subject -> category table

from quantstudy.config import TaskName
from quantstudy.store import ItemRecord
from quantstudy.tasks.base import Doc, Item, Sampler, Task, bad_format, hub_rows, need_file

LETTERS = ["A", "B", "C", "D"]
CATEGORIES = ("stem", "humanities", "social_sciences", "other")


class MMLUTask(Task):
    name = TaskName.mmlu
    hub = "cais/mmlu"
    sampler = Sampler.first_n

    def read_csv(self, path: Path, subject: str) -> list[Doc]:
        text = need_file(self.name.value, path, self.hub).read_text(encoding="utf-8")
        out = []
        for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise bad_format(self.name.value, path, f"row {n} should be question,A,B,C,D,answer-letter "
                                                        f"(no header), got {len(row)} columns")
            out.append({"question": row[0], "subject": subject, "choices": row[1:5],
                        "answer": LETTERS.index(row[5].strip())})
        return out

    def split_docs(self, data_dir: Path | None, split: str) -> dict[str, list[Doc]]:
        if data_dir is None:
            by: dict[str, list[Doc]] = {s: [] for s in SUBJECTS}
            for r in hub_rows(self.name.value, self.hub, "all", split):
                by[r["subject"]].append({"question": r["question"], "subject": r["subject"],
                                         "choices": list(r["choices"]), "answer": int(r["answer"])})
            return by
        return {s: self.read_csv(data_dir / "mmlu" / split / f"{s}_{split}.csv", s) for s in SUBJECTS}

    def eval_items(self, data_dir: Path | None) -> list[Item]:
        by = self.split_docs(data_dir, "test")
        # round-robin over subjects (see module doc); ids stay "<subject>/<row>"
        rows = [[Item(f"{s}/{i}", d, d["question"]) for i, d in enumerate(by[s])] for s in sorted(by)]
        return [it for layer in zip_longest(*rows) for it in layer if it is not None]

    def fewshot_docs(self, data_dir: Path | None) -> dict[str, list[Doc]]:
        return self.split_docs(data_dir, "dev")

    def fewshot_group(self, doc: Doc) -> str:
        return doc["subject"]

    def description(self, doc: Doc) -> str:
        return f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"

    def doc_to_text(self, doc: Doc) -> str:
        c = doc["choices"]
        return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"

    def doc_to_choice(self, doc: Doc) -> list[str]:
        return list(LETTERS)

    def gold(self, doc: Doc) -> int:
        return int(doc["answer"])

    def score_choices(self, item: Item, lls: list) -> ItemRecord:
        rec = super().score_choices(item, lls)
        rec.details.update(subject=item.doc["subject"], category=SUBJECTS[item.doc["subject"]])
        return rec

    def aggregate(self, records: list[ItemRecord]) -> dict[str, float]:
        def acc(rs: list[ItemRecord]) -> float:
            return sum(bool(r.correct) for r in rs) / len(rs)

        out: dict[str, float] = {"acc": acc(records), "n": len(records)}
        for key, group in (("subject", sorted(SUBJECTS)), ("category", CATEGORIES)):
            for g in group:
                rs = [r for r in records if r.details[key] == g]
                if rs:
                    name = g if key == "subject" else f"cat.{g}"
                    out[f"{name}.acc"], out[f"{name}.n"] = acc(rs), len(rs)
        return out
