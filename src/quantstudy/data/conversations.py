"""Conversations for calibration and training: read from raw files in an offline data dir, or the hub.

(The module is named for what it returns: "source" elsewhere is a model's origin, stages/resolve.py,
or the fidelity text; the study file's `calibration.source` / `train.source` name these readers.)

Every source becomes a list of `Conversation`s (an id and chat messages), so one sampler
and one chat-template step serve calibration and SFT alike. Offline file layout is that
of ../shared/data (see its SOURCES.md); without a data dir the hub datasets are used.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantstudy.errors import QuantStudyError

# source -> (file under the offline data dir, hub dataset id, hub config, hub split)
OFFLINE_FILES = {
    "sharegpt": "sharegpt/ShareGPT_V3_filtered_500.json",
    "openmathinstruct2": "openmathinstruct-2/openmathinstruct-2-train.json",
    "gsm8k": "gsm8k/train.jsonl",
    "wikitext": "wikitext-2-raw/wiki.test.raw",
}
HUB = {
    "sharegpt": ("anon8231489123/ShareGPT_Vicuna_unfiltered", None, "train"),
    "openmathinstruct2": ("nvidia/OpenMathInstruct-2", None, "train_1M"),
    "gsm8k": ("openai/gsm8k", "main", "train"),
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
}
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...); role in user/assistant/system

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def text_hash(self) -> str:
        """sha256 of the whitespace-normalized contents: stable across formats and templates."""
        norm = "\n".join(" ".join(c.split()) for _, c in self.messages)
        return hashlib.sha256(norm.encode()).hexdigest()


def _conv(i: str, *pairs: tuple[str, str]) -> Conversation:
    return Conversation(str(i), tuple((r, c) for r, c in pairs if c is not None))


def _from_record(i: int, rec: dict[str, Any], where: str) -> Conversation:
    """Any of the common record shapes -> Conversation (messages, conversations, prompt/response, text)."""
    rid = str(rec.get("id", i))
    if "messages" in rec or "conversations" in rec:
        turns = rec.get("messages") or rec.get("conversations") or []
        pairs = []
        for t in turns:
            role = _ROLES.get(str(t.get("role", t.get("from", ""))).lower())
            content = t.get("content", t.get("value"))
            if role is None or not isinstance(content, str):
                raise QuantStudyError(f"record {rid} has a turn without a known role/content", value=str(t)[:80],
                                      field=where, fix="use {'role': 'user'|'assistant'|'system', 'content': str}")
            pairs.append((role, content))
        return _conv(rid, *pairs)
    for q, a in (("problem", "generated_solution"), ("question", "answer"), ("prompt", "response"),
                 ("prompt", "completion"), ("instruction", "output")):
        if q in rec and a in rec:
            return _conv(rid, ("user", str(rec[q])), ("assistant", str(rec[a])))
    if isinstance(rec.get("text"), str):
        return _conv(rid, ("user", rec["text"]))
    raise QuantStudyError(f"record {rid} has none of the fields messages, conversations, prompt/response, "
                          "problem/generated_solution, question/answer or text", field=where,
                          value=sorted(rec)[:8], fix="convert the file to one of those shapes")


def _read_json_records(path: Path, where: str) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantStudyError(f"{path} is not valid JSON/JSONL: {e}", field=where,
                              fix="use one JSON object per line (JSONL) or a JSON array of objects") from None


def wikitext_documents(text: str) -> list[str]:
    """Split WikiText raw into articles at top-level ' = Title = ' headings (lm-eval does the same)."""
    docs, cur = [], []
    for line in text.split("\n"):
        if re.match(r"^ = [^=].* = $", line) and cur:
            docs.append("\n".join(cur).strip())
            cur = []
        cur.append(line)
    docs.append("\n".join(cur).strip())
    return [d for d in docs if d]


def _hub_rows(source: str, n_max: int | None) -> list[dict[str, Any]]:
    import datasets

    repo, name, split = HUB[source]
    try:
        ds = datasets.load_dataset(repo, name, split=split, streaming=True)
        return list(ds.take(n_max)) if n_max else list(ds)
    except Exception as e:  # the hub raises many types (connection, auth, offline)
        raise QuantStudyError(f"could not load {source!r} from the Hugging Face hub ({repo}): "
                              f"{e.__class__.__name__}: {str(e)[:200]}", field="data_dir",
                              fix="set `data_dir:` (or --data-dir) to an offline copy laid out like ../shared/data") from None


def load_conversations(source: str, data_dir: Path | None, path: Path | None = None,
                       field: str = "calibration.source", hub_limit: int | None = 20000) -> list[Conversation]:
    """Read a named source (or a local file) into conversations, in file order."""
    if source == "jsonl":
        if path is None or not path.is_file():
            raise QuantStudyError("local data file not found", field=field.replace("source", "path"),
                                  value=str(path), fix="point `path:` at an existing .jsonl or .json file")
        return [_from_record(i, r, str(path)) for i, r in enumerate(_read_json_records(path, field))]
    if source not in OFFLINE_FILES:
        raise QuantStudyError("unknown data source", field=field, value=source,
                              fix=f"use one of {sorted(OFFLINE_FILES) + ['jsonl']}")
    file = path or (data_dir / OFFLINE_FILES[source] if data_dir else None)
    if file is None:
        rows = _hub_rows(source, hub_limit)
        if source == "wikitext":
            return [_conv(f"wikitext-{i}", ("user", d))
                    for i, d in enumerate(wikitext_documents("".join(r["text"] for r in rows)))]
        return [_from_record(i, r, source) for i, r in enumerate(rows)]
    if not file.is_file():
        raise QuantStudyError(f"data file for source {source!r} not found", field=field, value=str(file),
                              fix=f"put {OFFLINE_FILES[source]} under the data dir, or drop data_dir to use the hub")
    if source == "wikitext":
        return [_conv(f"wikitext-{i}", ("user", d))
                for i, d in enumerate(wikitext_documents(file.read_text(encoding="utf-8")))]
    prefix = {"gsm8k": "gsm8k-train-", "openmathinstruct2": "omi2-"}.get(source, "")
    out = []
    for i, rec in enumerate(_read_json_records(file, field)):
        c = _from_record(i, rec, str(file))
        out.append(Conversation(prefix + c.id if prefix else c.id, c.messages))
    return out
