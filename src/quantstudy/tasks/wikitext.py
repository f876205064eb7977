"""WikiText-2 perplexity, as lm-eval's wikitext task (document level, test split).

Documents are the articles of wiki.test.raw, split at level-1 headings exactly like the
EleutherAI/wikitext_document_level loader (62 test documents). Each document is detokenized
with lm-eval's own `wikitext_detokenizer` and scored with a rolling loglikelihood (windows of
the model's max length, every token predicted once). Aggregates, as lm-eval's
`weighted_perplexity` / `bits_per_byte`, summed over documents before dividing:
  word_perplexity  = exp(-sum ll / sum words)   words of the *raw* page: len(re.split(r"\\s+", page))
  byte_perplexity  = exp(-sum ll / sum bytes)   UTF-8 bytes of the raw page
  bits_per_byte    = -sum ll / sum bytes / ln 2
  token_perplexity = exp(-sum ll / sum tokens)  (ours; depends on the tokenizer)
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

from quantstudy.config import TaskName
from quantstudy.scoring.protocol import RollingResult
from quantstudy.store import ItemRecord
from quantstudy.tasks.base import Doc, Item, Kind, Task, bad_format, hub_rows, need_file

FILE = Path("wikitext-2-raw") / "wiki.test.raw"


def split_documents(raw: str) -> list[str]:
    """EleutherAI/wikitext_document_level's _generate_examples: a page starts at " = Title = "."""
    pages, cur = [], []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(cur)
            if page.strip():
                pages.append(page)
            cur = []
        cur.append(line)
    pages.append("\n".join(cur))
    return pages


class WikiTextTask(Task):
    name = TaskName.wikitext
    kind = Kind.rolling
    primary_metric, higher_is_better = "word_perplexity", False  # per-document NLL weighted by words
    hub = "EleutherAI/wikitext_document_level"

    def eval_items(self, data_dir: Path | None) -> list[Item]:
        if data_dir is None:
            pages = [r["page"] for r in hub_rows(self.name.value, self.hub, "wikitext-2-raw-v1", "test")]
        else:
            path = need_file(self.name.value, data_dir / FILE, f"{self.hub} (wikitext-2-raw-v1)")
            pages = split_documents(path.read_text(encoding="utf-8"))
            if len(pages) < 2:
                raise bad_format(self.name.value, path, "raw WikiText with ' = Title = ' article headings")
        return [Item(f"test/{i}", {"page": p}, p) for i, p in enumerate(pages)]

    def rolling_text(self, doc: Doc) -> str:
        return wikitext_detokenizer(doc)

    def score_rolling(self, item: Item, res: RollingResult) -> ItemRecord:
        page = item.doc["page"]
        return ItemRecord(task=self.name.value, item_id=item.id, item_hash=item.hash, prompt_hash="",
                          gold="", prediction="", correct=None, score=-res.logprob,
                          details={"logprob": res.logprob, "n_tokens": res.n_tokens,
                                   "n_words": len(re.split(r"\s+", page)), "n_bytes": len(page.encode("utf-8"))})

    def aggregate(self, records: list[ItemRecord]) -> dict[str, float]:
        ll = sum(r.details["logprob"] for r in records)
        words, nbytes, toks = (sum(r.details[k] for r in records) for k in ("n_words", "n_bytes", "n_tokens"))
        return {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
                "bits_per_byte": -ll / nbytes / math.log(2), "token_perplexity": math.exp(-ll / toks),
                "n": len(records)}
