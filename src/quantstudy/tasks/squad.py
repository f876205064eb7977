"""SQuAD v2, as lm-eval's squadv2 task (generative, 0-shot, validation split).

Prompt "Title: ..\\n\\nBackground: ..\\n\\nQuestion: ..\\n\\nAnswer:", greedy generation until
"\\n". Scored with the official SQuAD v2 script's rules (transformers ships a port of it:
normalize_answer = lowercase, drop punctuation and articles, squeeze whitespace; EM/F1 = max
over the gold answers; an unanswerable question's gold is "" so only an empty answer scores).
lm-eval's extra " unanswerable" loglikelihood only feeds best_exact/best_f1 (a threshold
search on the no-answer probability); exact/f1/HasAns/NoAns do not use it at the official
threshold of 1.0, so we do not request it. Metrics are fractions (lm-eval prints x100).
"""

from __future__ import annotations

import json
from pathlib import Path

from quantstudy.config import TaskName
from quantstudy.scoring.protocol import GenResult
from quantstudy.store import ItemRecord
from quantstudy.tasks.base import Doc, Item, Kind, Task, bad_format, hub_rows, need_file

FILES = (Path("squad_v2") / "dev-v2.0.json", Path("squad_v2") / "dev-v2.0.reconstructed.json")


def squad_scores(answers: list[str], prediction: str) -> tuple[float, float]:
    """(exact, f1) for one question, as the official evaluate-v2.0.py computes them."""
    from transformers.data.metrics.squad_metrics import compute_exact, compute_f1, normalize_answer

    gold = [a for a in answers if normalize_answer(a)] or [""]
    return (float(max(compute_exact(a, prediction) for a in gold)),
            float(max(compute_f1(a, prediction) for a in gold)))


class SquadV2Task(Task):
    name = TaskName.squad_v2
    kind = Kind.generate
    primary_metric, score_metric = "em", "f1"
    hub = "lighteval/squad_v2"
    until = ("\n",)

    def eval_items(self, data_dir: Path | None) -> list[Item]:
        docs = self.from_json(data_dir) if data_dir is not None else self.from_hub("validation")
        return [Item(d["id"], d, d["question"]) for d in docs]

    def fewshot_docs(self, data_dir: Path | None) -> dict[str, list[Doc]]:
        if data_dir is not None:
            return super().fewshot_docs(data_dir)  # the offline set holds only dev: no train split
        return {"": self.from_hub("train")}

    def from_hub(self, split: str) -> list[Doc]:
        return [{"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
                 "answers": list(r["answers"]["text"])} for r in hub_rows(self.name.value, self.hub, None, split)]

    def from_json(self, data_dir: Path) -> list[Doc]:
        path = next((data_dir / f for f in FILES if (data_dir / f).is_file()), data_dir / FILES[0])
        need_file(self.name.value, path, self.hub)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))["data"]
            return [{"id": qa["id"], "title": art["title"], "context": par["context"], "question": qa["question"],
                     "answers": [a["text"] for a in qa["answers"]]}
                    for art in data for par in art["paragraphs"] for qa in par["qas"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise bad_format(self.name.value, path, f"SQuAD v2 json with data/paragraphs/qas ({e!r})") from None

    def doc_to_text(self, doc: Doc) -> str:
        return (f"Title: {doc['title']}\n\nBackground: {doc['context']}\n\n"
                f"Question: {doc['question']}\n\nAnswer:")

    def doc_to_target(self, doc: Doc) -> str:
        # lm-eval's SQuAD2.doc_to_target: " " + answer, after the default " " delimiter (two spaces)
        return " " + (doc["answers"][0] if doc["answers"] else "unanswerable")

    def gold(self, doc: Doc) -> str:
        return json.dumps(doc["answers"], ensure_ascii=False)

    def score_generation(self, item: Item, gen: GenResult) -> ItemRecord:
        em, f1 = squad_scores(item.doc["answers"], gen.text)
        return ItemRecord(task=self.name.value, item_id=item.id, item_hash=item.hash, prompt_hash="",
                          gold=self.gold(item.doc), prediction=gen.text, correct=em == 1.0, score=f1,
                          details={"has_answer": bool(item.doc["answers"]), "text": gen.text})

    def aggregate(self, records: list[ItemRecord]) -> dict[str, float]:
        out: dict[str, float] = {"n": len(records)}
        for prefix, rs in (("", records), ("has_ans_", [r for r in records if r.details["has_answer"]]),
                           ("no_ans_", [r for r in records if not r.details["has_answer"]])):
            if rs:
                out[prefix + "em"] = sum(bool(r.correct) for r in rs) / len(rs)
                out[prefix + "f1"] = sum(float(r.score or 0.0) for r in rs) / len(rs)
                out[prefix + "n"] = len(rs)
        out["acc"] = out["em"]
        return out
