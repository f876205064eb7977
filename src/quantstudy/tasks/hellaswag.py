"""HellaSwag, as lm-eval's hellaswag.yaml + utils.process_docs (validation split, 0-shot).

query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices =
preprocess(endings), acc and acc_norm.

Offline: the llama.cpp `--hellaswag` text file (6 lines per task: context, gold index, 4
endings), already cleaned with lm-eval's preprocess. That file joins ctx_a and ctx_b *without*
lm-eval's `ctx_b.capitalize()`, and it has no ctx_a/ctx_b split. We restore it: ctx_b is the
unfinished sentence after the last sentence end (ActivityNet items: "... on a roof. he"), and
str.capitalize() is applied to it ("He"). WikiHow items have an empty ctx_b and end with a full
sentence, so they are unchanged. Checked on published val rows in tests/test_tasks.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from quantstudy.config import TaskName
from quantstudy.tasks.base import Doc, Item, Task, bad_format, hub_rows, need_file

FILE = Path("hellaswag") / "hellaswag_val_full.txt"
# a sentence end, then the unfinished fragment that the endings complete
_FRAGMENT = re.compile(r"^(.*[.!?][\"')]?) (\S[^\n]*)$", re.S)
_ENDS_SENTENCE = re.compile(r"[.!?][\"')]?$")


def restore_ctx_b(query: str) -> str:
    """lm-eval capitalizes ctx_b; the llama.cpp file does not. Re-apply it to the trailing fragment."""
    label, sep, ctx = query.partition(": ")
    m = _FRAGMENT.match(ctx)
    if not sep or m is None or _ENDS_SENTENCE.search(m.group(2)):
        return query
    return f"{label}: {m.group(1)} {m.group(2).capitalize()}"


class HellaSwagTask(Task):
    name = TaskName.hellaswag
    hub = "Rowan/hellaswag"

    def eval_items(self, data_dir: Path | None) -> list[Item]:
        docs = self.from_text(data_dir / FILE) if data_dir is not None else self.from_hub()
        return [Item(str(i), d, d["query"]) for i, d in enumerate(docs)]

    def from_text(self, path: Path) -> list[Doc]:
        lines = need_file(self.name.value, path, self.hub).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines or len(lines) % 6:
            raise bad_format(self.name.value, path, f"{len(lines)} lines is not a multiple of 6 "
                                                    "(context, gold index, 4 endings per task)")
        out = []
        for k in range(0, len(lines), 6):
            gold = lines[k + 1].strip()
            if gold not in {"0", "1", "2", "3"}:
                raise bad_format(self.name.value, path, f"line {k + 2} should be the gold index 0-3, got {gold!r}")
            out.append({"query": restore_ctx_b(lines[k]), "choices": lines[k + 2:k + 6], "gold": int(gold)})
        return out

    def fewshot_docs(self, data_dir: Path | None) -> dict[str, list[Doc]]:
        if data_dir is not None:
            return super().fewshot_docs(data_dir)  # the offline file is the validation split only
        return {"": self.from_hub("train")}

    def from_hub(self, split: str = "validation") -> list[Doc]:
        from lm_eval.tasks.hellaswag.utils import preprocess  # lm-eval's own cleaning

        return [{"query": preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
                 "choices": [preprocess(e) for e in r["endings"]], "gold": int(r["label"])}
                for r in hub_rows(self.name.value, self.hub, None, split)]

    def doc_to_text(self, doc: Doc) -> str:
        return doc["query"]

    def doc_to_choice(self, doc: Doc) -> list[str]:
        return list(doc["choices"])

    def gold(self, doc: Doc) -> int:
        return int(doc["gold"])
