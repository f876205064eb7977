"""Evaluation stage end to end on tiny random Llamas: one row per item, resume, same items per model.

Resume is checked on the store itself (row ids and stored latencies stay untouched when a
row is not rescored), never through mocks. The lm-eval backend is checked against a direct
float64 forward pass and against transformers' own greedy generate.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from rich.console import Console

from quantstudy.config import TaskName, TaskSpec, parse_config
from quantstudy.runtime.context import RunContext
from quantstudy.stages.evaluate import make_scorer
from quantstudy.tasks.selection import select_items
from quantstudy.scoring.protocol import GenRequest, LLRequest
from quantstudy.store import ModelRecord, Store
from quantstudy.study import run_stage

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WIKI = " = Alpha = \n \n The alpha article has words . \n \n = Beta = \n \n Beta text @-@ here . \n" \
       " = Gamma = \n \n Gamma , with a comma . \n"


def tiny_model(root: Path, shared_data: Path, seed: int) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:300]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = CHAT
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny")
    return [tiny_model(root / f"m{s}", shared_data, s) for s in (0, 1)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """The shared data (linked, not copied) with a three-article WikiText file, to keep perplexity fast."""
    d = tmp_path_factory.mktemp("data")
    for name in ("arc", "hellaswag", "mmlu", "squad_v2", "gsm8k", "openmathinstruct-2"):
        (d / name).symlink_to(shared_data / name)
    (d / "wikitext-2-raw").mkdir()
    (d / "wikitext-2-raw" / "wiki.test.raw").write_text(WIKI)
    return d


def make_ctx(tmp: Path, data_dir: Path, **evaluate) -> RunContext:
    cfg = parse_config({"name": "t", "model": {"source": "x"}, "evaluate": {"batch_size": 4, "max_new_tokens": 6,
                                                                             "backend": "lmeval", **evaluate}})
    return RunContext(cfg=cfg, study_dir=tmp, config_dir=tmp, store=Store(tmp / "store.sqlite"), data_dir=data_dir,
                      device="cpu", console=Console(quiet=True))


def rows(ctx: RunContext, model: str, task: str) -> dict[str, tuple]:
    db = sqlite3.connect(ctx.store.path)
    q = "SELECT item_id, rowid, latency_s, prompt_hash FROM items WHERE model=? AND task=?"
    return {r[0]: r[1:] for r in db.execute(q, (model, task))}


def test_select_items_first_random_and_stable(tmp_path: Path, data_dir: Path) -> None:
    first = make_ctx(tmp_path, data_dir, limit=20)
    rand = make_ctx(tmp_path, data_dir, limit=20, limit_mode="random")
    spec = TaskSpec(name=TaskName.arc_easy, limit=20)
    ids_first = [it.id for it in select_items(spec, first.cfg.evaluate, data_dir)]
    ids_rand = [it.id for it in select_items(spec, rand.cfg.evaluate, data_dir)]
    assert ids_first == [it.id for it in select_items(TaskSpec(name=TaskName.arc_easy), first.cfg.evaluate, data_dir)][:20]
    assert ids_rand == [it.id for it in select_items(spec, rand.cfg.evaluate, data_dir)] and ids_rand != ids_first
    other_seed = make_ctx(tmp_path, data_dir, limit=20, limit_mode="random", seed=7)
    assert [it.id for it in select_items(spec, other_seed.cfg.evaluate, data_dir)] != ids_rand
    assert len(select_items(TaskSpec(name=TaskName.wikitext, limit=50), first.cfg.evaluate, data_dir)) == 3  # limit > items: all
    mmlu = select_items(TaskSpec(name=TaskName.mmlu, limit=57), first.cfg.evaluate, data_dir)
    assert len({it.doc["subject"] for it in mmlu}) == 57 and all(it.id.endswith("/0") for it in mmlu)


def test_evaluate_end_to_end_resume_and_rescore(tmp_path: Path, data_dir: Path, models: list[Path]) -> None:
    tasks = [t.value for t in TaskName if t not in (TaskName.gsm8k,)] + [{"name": "gsm8k", "num_fewshot": 1}]
    ctx = make_ctx(tmp_path, data_dir, tasks=tasks, limit=3)
    model = ModelRecord("base", "baseline", str(models[0]))
    run_stage(ctx, "evaluate", model)
    before = {t.value: rows(ctx, "base", t.value) for t in TaskName}
    assert all(len(r) == 3 for r in before.values()), {t: len(r) for t, r in before.items()}
    metrics = {n: v for _, n, v, _ in ctx.store.metrics("base")}
    for key in ("arc_easy.acc", "arc_easy.acc_norm", "mmlu.acc", "squad_v2.f1", "squad_v2.has_ans_em",
                "gsm8k.em_flexible", "openmathinstruct2.acc", "wikitext.word_perplexity", "hellaswag.n"):
        assert f"eval.{key}" in metrics, key
    assert metrics["eval.hellaswag.n"] == 3 and metrics["eval.wikitext.word_perplexity"] > 1
    gen = next(r for _, r in ctx.store.items("base", "gsm8k"))
    assert gen.n_tokens is not None and gen.hit_max is not None and "text" in gen.details
    mc = next(r for _, r in ctx.store.items("base", "arc_easy"))
    assert len(mc.details["loglikelihoods"]) == len(mc.details["lengths_chars"]) >= 3

    run_stage(ctx, "evaluate", model)  # nothing to do: same rows, same stored latencies
    assert {t.value: rows(ctx, "base", t.value) for t in TaskName} == before
    timed = {n: (v, i) for _, n, v, i in ctx.store.metrics("base") if n.startswith("time.eval.")}
    assert set(timed) == {f"time.eval.{t.value}" for t in TaskName}  # the no-op run re-timed nothing
    assert all(v > 0 and i["items_scored"] == 3 for v, i in timed.values())

    # an interrupted run: one arc item missing; and a larger limit: only the missing/new items are scored
    ctx.store.db.execute("DELETE FROM items WHERE model='base' AND task='arc_easy' AND item_id=?",
                         (sorted(before["arc_easy"])[0],))
    ctx2 = make_ctx(tmp_path, data_dir, tasks=["arc_easy"], limit=5)
    run_stage(ctx2, "evaluate", model)
    after = rows(ctx2, "base", "arc_easy")
    kept = set(before["arc_easy"]) - {sorted(before["arc_easy"])[0]}
    assert len(after) == 5 and all(after[i] == before["arc_easy"][i] for i in kept)

    # a different prompt (1-shot instead of 0-shot) is a different measurement: rescored
    ctx3 = make_ctx(tmp_path, data_dir, tasks=["arc_easy"], limit=5, num_fewshot=1)
    run_stage(ctx3, "evaluate", model)
    rescored = rows(ctx3, "base", "arc_easy")
    assert all(rescored[i][2] != after[i][2] for i in after)
    info = {n: i for _, n, _, i in ctx3.store.metrics("base")}["eval.arc_easy.acc"]
    assert (info["num_fewshot"], info["n"], info["backend"]) == (1, 5, ["lmeval-hf"])


def test_per_task_chat_template_override(tmp_path: Path, data_dir: Path, models: list[Path]) -> None:
    # an instruct model may need its chat template for one generative task only
    ctx = make_ctx(tmp_path, data_dir, tasks=["arc_easy", {"name": "openmathinstruct2", "chat_template": True}],
                   limit=2, max_new_tokens=2)
    run_stage(ctx, "evaluate", ModelRecord("base", "baseline", str(models[0])))
    info = {n: i for _, n, _, i in ctx.store.metrics("base")}
    assert info["eval.arc_easy.acc"]["chat_template"] is False
    assert info["eval.openmathinstruct2.acc"]["chat_template"] is True
    plain = make_ctx(tmp_path / "plain", data_dir, tasks=["openmathinstruct2"], limit=2, max_new_tokens=2)
    run_stage(plain, "evaluate", ModelRecord("base", "baseline", str(models[0])))
    chat_hash = {r.item_id: r.prompt_hash for _, r in ctx.store.items("base", "openmathinstruct2")}
    assert all(chat_hash[r.item_id] != r.prompt_hash for _, r in plain.store.items("base", "openmathinstruct2"))


def test_every_model_gets_the_same_items(tmp_path: Path, data_dir: Path, models: list[Path]) -> None:
    ctx = make_ctx(tmp_path, data_dir, tasks=["arc_challenge", "squad_v2"], limit=4, limit_mode="random",
                   chat_template=True)
    for i, path in enumerate(models):
        run_stage(ctx, "evaluate", ModelRecord(f"m{i}", "quantized", str(path)))
    for task in ("arc_challenge", "squad_v2"):
        a, b = rows(ctx, "m0", task), rows(ctx, "m1", task)
        assert len(a) == 4 and set(a) == set(b) and {k: v[2] for k, v in a.items()} == {k: v[2] for k, v in b.items()}


def test_lmeval_scorer_against_direct_computation(tmp_path: Path, data_dir: Path, models: list[Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantstudy.scoring.lmeval_backend import LMEvalScorer

    model = AutoModelForCausalLM.from_pretrained(models[0]).eval()
    tok = AutoTokenizer.from_pretrained(models[0])
    scorer = make_scorer(make_ctx(tmp_path, data_dir), model, tok)
    assert isinstance(scorer, LMEvalScorer)
    ctx_text, cont = "Question: how many eggs are left?\nAnswer:", " 12 eggs"
    res = scorer.loglikelihood([LLRequest(ctx_text, cont)])[0]
    ids_ctx, ids_all = tok.encode(ctx_text), tok.encode(ctx_text + cont)
    assert ids_all[:len(ids_ctx)] == ids_ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids_all])).logits[0].double(), -1)
    want = sum(float(logp[i - 1, ids_all[i]]) for i in range(len(ids_ctx), len(ids_all)))
    assert res.n_tokens == len(ids_all) - len(ids_ctx) and res.logprob == pytest.approx(want, abs=1e-4)

    prompts = ["Question: what is the total?\nAnswer:", "She has 3 apples"]
    gens = scorer.generate([GenRequest(p, ("\n\n",), 7) for p in prompts])
    for p, g in zip(prompts, gens):
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        text = tok.decode(out, skip_special_tokens=True)
        stopped = "\n\n" in text or tok.eos_token_id in out.tolist()
        assert g.text == text.split("\n\n")[0] and g.hit_max == (not stopped and len(out) == 7)
        assert g.latency_s > 0 and 0 <= g.n_tokens <= 7
