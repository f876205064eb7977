"""Calibration sampling: reproducible, prefix-shared across sample counts, recorded by id and hash."""

from __future__ import annotations

import json

import pytest

from quantstudy.data.calibration import build_calibration, sample_conversations
from quantstudy.config import CalibrationConfig
from quantstudy.errors import QuantStudyError
from quantstudy.data.conversations import Conversation, load_conversations, wikitext_documents


class PlainTok:
    chat_template = None


def pool(n):
    return [Conversation(f"c{i}", (("user", f"text {i}"),)) for i in range(n)]


def test_smaller_sample_is_prefix_of_larger_with_same_seed():
    small = sample_conversations(pool(600), 215, seed=3, where="x")
    large = sample_conversations(pool(600), 512, seed=3, where="x")
    assert [c.id for c in large[:215]] == [c.id for c in small]
    other = sample_conversations(pool(600), 215, seed=4, where="x")
    assert [c.id for c in other] != [c.id for c in small]


def test_more_samples_than_source_names_counts():
    with pytest.raises(QuantStudyError, match=r"asks for 11 calibration samples but the source has only 10"):
        sample_conversations(pool(10), 11, 0, "calibration.samples")


@pytest.mark.parametrize("source, count, first_id", [
    ("sharegpt", 500, "fzcoUcK_0"), ("openmathinstruct2", 1000, "omi2-0"), ("gsm8k", 7473, "gsm8k-train-0")])
def test_offline_sources(shared_data, source, count, first_id):
    convs = load_conversations(source, shared_data)
    assert len(convs) == count and convs[0].id == first_id
    assert all(c.messages and c.messages[0][0] == "user" for c in convs[:50])


def test_openmath_and_gsm8k_carry_the_answer_as_assistant_turn(shared_data):
    row = json.loads((shared_data / "gsm8k/train.jsonl").open().readline())
    c = load_conversations("gsm8k", shared_data)[0]
    assert c.messages == (("user", row["question"]), ("assistant", row["answer"]))


def test_wikitext_split_into_articles(shared_data):
    docs = wikitext_documents((shared_data / "wikitext-2-raw/wiki.test.raw").read_text())
    assert docs[0].startswith("= Robert Boulter =")
    assert 50 < len(docs) < 100  # WikiText-2 test has 62 articles


def test_jsonl_source_with_messages_and_recorded_hashes(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                                                      {"role": "assistant", "content": f"a{i}"}]})
                           for i in range(5)))
    cs = build_calibration(CalibrationConfig(source="jsonl", path=str(f), samples=3, chat_template=False),
                           PlainTok(), None, tmp_path)
    assert len(cs.ids) == 3 and set(cs.ids) <= {f"r{i}" for i in range(5)}
    import hashlib

    assert cs.hashes == [hashlib.sha256(t.encode()).hexdigest() for t in cs.texts]
    assert cs.texts[0].startswith("q") and "\n\na" in cs.texts[0]


def test_bad_jsonl_names_the_file(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": 1, "foo": "bar"}\n')
    with pytest.raises(QuantStudyError, match="none of the fields messages"):
        load_conversations("jsonl", None, f)
    f.write_text("{not json\n")
    with pytest.raises(QuantStudyError, match="not valid JSON"):
        load_conversations("jsonl", None, f)


def test_calibration_on_evaluated_text_is_refused() -> None:
    from quantstudy.data.heldout import check_held_out
    from quantstudy.config import parse_config

    def study(calib: str, tasks: list[str], fidelity: bool) -> tuple:
        cfg = parse_config({"name": "s", "model": {"source": "x"}, "calibration": {"source": calib},
                            "evaluate": {"tasks": tasks}, "fidelity": {} if fidelity else None})
        return cfg, [("calibration.source", cfg.calibration)]

    with pytest.raises(QuantStudyError, match="fidelity.source wikitext") as e:
        check_held_out(*study("wikitext", ["arc_easy"], True), offline=True)
    assert "calibration.source" in e.value.field and "hub's wikitext train split" in str(e.value.fix)
    with pytest.raises(QuantStudyError, match="evaluate task wikitext"):
        check_held_out(*study("wikitext", ["wikitext"], False), offline=True)
    with pytest.raises(QuantStudyError, match="evaluate task openmathinstruct2"):
        check_held_out(*study("openmathinstruct2", ["openmathinstruct2"], False), offline=False)
    check_held_out(*study("wikitext", ["wikitext"], True), offline=False)  # hub: calibrates on the train split
    check_held_out(*study("gsm8k", ["gsm8k", "wikitext"], True), offline=True)  # train vs test files
