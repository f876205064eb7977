"""Speed/memory measurement: statistics against numpy and hand counts; metrics land in the store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from quantstudy.config import parse_config
from quantstudy.context import RunContext
from quantstudy.measure import GenStat, measure_model, percentile, speed_prompts, summarize
from quantstudy.models import weights_size
from quantstudy.store import ModelRecord, Store
from tests.tiny import make_tiny_model


@pytest.mark.parametrize("n", [1, 2, 5, 8, 19])
def test_percentile_matches_numpy(n):
    xs = list(np.random.default_rng(n).exponential(size=n))
    for q in (0, 25, 50, 95, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q), rel=1e-12)


def test_summarize_counts_by_hand():
    stats = [GenStat(1.0, 0.1, 64, True, False),  # ran to the budget
             GenStat(0.5, 0.2, 10, False, False),
             GenStat(0.1, 0.1, 1, False, True),  # EOS at once: one token, empty text
             GenStat(2.4, 0.2, 64, True, True)]  # 64 whitespace tokens: hit the budget and empty
    s = summarize(stats)
    assert s["hit_max_share"] == 0.5 and s["empty_share"] == 0.5
    assert s["tokens_per_response"] == (64 + 10 + 1 + 64) / 4
    assert s["tokens_per_s"] == pytest.approx(139 / 4.0)
    assert s["latency_mean_s"] == pytest.approx(1.0) and s["ttft_mean_s"] == pytest.approx(0.15)
    assert s["latency_p50_s"] == pytest.approx(np.percentile([1.0, 0.5, 0.1, 2.4], 50))
    assert s["latency_p95_s"] == pytest.approx(np.percentile([1.0, 0.5, 0.1, 2.4], 95))


def _ctx(tmp_path: Path, data_dir: Path, prompts: int, max_new: int) -> RunContext:
    cfg = parse_config({"name": "m", "model": {"source": "x"},
                        "evaluate": {"speed": {"prompts": prompts, "max_new_tokens": max_new, "warmup": 1}}})
    return RunContext(cfg=cfg, study_dir=tmp_path, config_dir=tmp_path, store=Store(tmp_path / "s.sqlite"),
                      data_dir=data_dir, device="cpu", console=Console(quiet=True))


def _sharegpt(root: Path, prompts: list[str]) -> Path:
    f = root / "data" / "sharegpt" / "ShareGPT_V3_filtered_500.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps([{"id": f"c{i}", "conversations": [{"from": "human", "value": p}]}
                             for i, p in enumerate(prompts)]))
    return root / "data"


def test_prompts_are_the_first_user_turns(tmp_path):
    data = _sharegpt(tmp_path, ["first", "   ", "second", "third"])
    assert speed_prompts(_ctx(tmp_path, data, 2, 4), 2) == ["first", "second"]  # blank turns skipped


def _expected(model_dir: Path, prompts: list[str], max_new: int) -> list[GenStat]:
    """Independent reference: HF generate (greedy) on the chat-templated prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    out = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      tokenize=False)
        ids = torch.tensor([tok.encode(ids, add_special_tokens=False)])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        gen = gen[0, ids.shape[1]:].tolist()
        n = gen.index(tok.eos_token_id) + 1 if tok.eos_token_id in gen else len(gen)
        out.append(GenStat(1.0, 0.5, n, n == max_new and tok.eos_token_id not in gen[:n],
                           not tok.decode(gen[:n], skip_special_tokens=True).strip()))
    return out


def test_measure_model_writes_labelled_metrics(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_tiny_model(tmp_path / "tiny")
    prompts = ["the cat sat on a mat", "how many dogs ran past", "what is the sum"]
    # make EOS likely where the second prompt's greedy answer has a token the others never produce:
    # that token's output row, slightly scaled, becomes EOS's row -> a mix of stopped and full answers
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    before = []
    for p in prompts:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True), add_special_tokens=False)
        with torch.no_grad():
            before.append(model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                         pad_token_id=tok.pad_token_id)[0, len(ids):].tolist())
    mark = next(t for t in before[1][1:] if t not in before[0] + before[2])
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 1.05 * model.lm_head.weight[mark]
    model.save_pretrained(model_dir)
    want = _expected(model_dir, prompts, 6)
    assert {w.hit_max for w in want} == {True, False}
    ctx = _ctx(tmp_path, _sharegpt(tmp_path, prompts), prompts=3, max_new=6)
    measure_model(ctx, ModelRecord("base", "baseline", str(model_dir)))
    m = {name: (value, info) for _, name, value, info in ctx.store.metrics("base")}
    for key in ("latency_mean_s", "latency_p50_s", "latency_p95_s", "ttft_mean_s", "tokens_per_response",
                "tokens_per_s", "hit_max_share", "empty_share"):
        value, info = m[f"speed.{key}"]
        assert info["backend"] == "transformers-cpu" and info["weights"] == "decompressed"
        assert info["n_prompts"] == 3 and info["max_new_tokens"] == 6 and info["device"] == "cpu"
    ref = summarize(want)
    for key in ("tokens_per_response", "hit_max_share", "empty_share"):
        assert m[f"speed.{key}"][0] == pytest.approx(ref[key]), key
    assert 0 < m["speed.ttft_mean_s"][0] <= m["speed.latency_mean_s"][0]
    peak, info = m["memory.peak_bytes"]
    assert "RSS" in info["measured"] and peak > info["rss_before_load_bytes"] > 0
    assert m["memory.weights_bytes"][0] == weights_size(model_dir) > 0
