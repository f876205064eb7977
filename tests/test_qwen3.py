"""Qwen3 through every stage on tiny random models (dense and MoE, Qwen3's real chat template),
chat-template arguments everywhere a template is rendered, thinking-aware scoring, and bounded
vocabulary buffers at Qwen3's 151,936-token vocabulary."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from quantstudy.data import chat
from quantstudy.data.calibration import render as calib_render
from quantstudy.config import parse_config
from quantstudy.errors import QuantStudyError
from quantstudy.stages.resolve import resolve_source
from quantstudy.runtime.modeldir import load_pretrained
from quantstudy.stages.quantize import run_oneshot
from quantstudy.stages.quantize_log import LayerReport
from quantstudy.data.conversations import Conversation
from tests.test_quantize import calib_dataset, levels_per_group, variant
from tests.tiny_qwen3 import QWEN3_VOCAB, ScriptedReasoning, make_tiny_qwen3

ROOT = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "What is 3 plus 4?"}]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "m")


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("qwen3moe") / "m", moe=True)


# ------------------------------------------------------------------ chat template arguments
def test_enable_thinking_reaches_every_renderer(qwen3):
    from transformers import AutoTokenizer

    from quantstudy.stages import measure
    from quantstudy.stages.evaluate import chat_fn
    from quantstudy.data.train_data import as_records

    tok = AutoTokenizer.from_pretrained(qwen3)
    head = "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"
    # Qwen3's template: thinking off pre-fills an empty block; on (or unset) leaves the turn open
    assert chat.render(tok, USER, {"enable_thinking": False}) == head + "<think>\n\n</think>\n\n"
    assert chat.render(tok, USER, {"enable_thinking": True}) == head == chat.render(tok, USER, None)
    assert chat_fn(tok, {"enable_thinking": False})(USER) == head + "<think>\n\n</think>\n\n"
    conv = Conversation("c", (("user", "What is 3 plus 4?"),))
    assert calib_render(conv, tok, True, {"enable_thinking": False}).endswith("</think>\n\n")
    assert not calib_render(conv, tok, True, None).endswith("</think>\n\n")
    off = tok.encode(head + "<think>\n\n</think>\n\n", add_special_tokens=False)
    if hasattr(measure, "encode_prompts"):  # the speed prompts (measure.py's paired benchmark)
        assert measure.encode_prompts(tok, ["What is 3 plus 4?"], {"enable_thinking": False}) == [off]
    rows = as_records([Conversation("c", (("user", "q"), ("assistant", "a")))], True, {"enable_thinking": False})
    assert rows[0]["chat_template_kwargs"] == {"enable_thinking": False}  # TRL's per-row template arguments
    assert "chat_template_kwargs" not in as_records([Conversation("c", (("user", "q"), ("assistant", "a")))], True)[0]


def test_chat_template_kwargs_config_and_prompt_hash(qwen3):
    from quantstudy.stages.evaluate import Prompt
    from quantstudy.tasks import Item

    cfg = parse_config({"name": "t", "model": {"source": "x/y", "chat_template_kwargs": {"enable_thinking": False}},
                        "evaluate": {"tasks": ["gsm8k", {"name": "gsm8k", "alias": "gsm8k-think",
                                                         "chat_template_kwargs": {"enable_thinking": True}}]}})
    specs = cfg.evaluate.task_specs()
    assert [s.key for s in specs] == ["gsm8k", "gsm8k-think"]
    assert chat.merged_kwargs(cfg.model.chat_template_kwargs, specs[1].chat_template_kwargs) == {"enable_thinking": True}
    with pytest.raises(QuantStudyError, match="alias"):  # the same task twice without an alias
        parse_config({"name": "t", "model": {"source": "x/y"}, "evaluate": {"tasks": ["gsm8k", "gsm8k"]}}
                     ).evaluate.task_specs()
    with pytest.raises(QuantStudyError, match="chat_template_kwargs.*add_generation_prompt"):
        parse_config({"name": "t", "model": {"source": "x/y", "chat_template_kwargs": {"add_generation_prompt": 1}}})
    item = Item("1", {}, "q")
    plain = Prompt(item, "ctx")
    assert plain.hash == Prompt(item, "ctx", "").hash  # no kwargs: the hash of studies written before them
    assert Prompt(item, "ctx", chat.kwargs_tag({"enable_thinking": True})).hash != plain.hash


# ------------------------------------------------------------------ thinking-aware reading
def test_split_reasoning_by_hand():
    think = chat.Think("<think>", "</think>")
    sp = chat.split_reasoning("<think>\nso 3+4=7\n</think>\n\nThe answer is 7", think)
    assert (sp.reasoning, sp.answer, sp.closed) == ("<think>\nso 3+4=7\n</think>", "The answer is 7", True)
    sp = chat.split_reasoning("<think>\nstill going", think)
    assert (sp.answer, sp.closed, sp.unfinished) == ("", False, True)  # no answer while still reasoning
    assert chat.split_reasoning("plain 7", think) == chat.Split(None, "plain 7", False)
    assert chat.split_reasoning("<think>x</think> 7", None).answer == "<think>x</think> 7"  # extraction off
    pre = chat.Think.for_prompt("<think>", "</think>", "...assistant\n<think>\n")  # a template that pre-opens
    assert pre.open_in_prompt and chat.split_reasoning("thinking", pre).unfinished
    off = chat.Think.for_prompt("<think>", "</think>", "...assistant\n<think>\n\n</think>\n\n")
    assert not off.open_in_prompt and chat.split_reasoning("7", off).reasoning is None
    # the stop string inside the reasoning does not cut the answer (lm-eval strips reasoning first)
    assert chat.cut_at_stops(chat.split_reasoning("<think>Question: x</think>7\nQuestion: y", think).answer,
                             ["Question:"]) == "7\n"


def test_reasoning_token_count_matches_tokenizer(qwen3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3)
    block = tok.encode("<think> the cat sat</think>", add_special_tokens=False)
    tail = tok.encode(" 7 and more", add_special_tokens=False)
    dec = lambda t: tok.decode(t)  # noqa: E731
    assert chat.reasoning_token_count(block + tail, dec, "</think>") == len(block)
    assert chat.reasoning_token_count(block + block + tail, dec, "</think>") == 2 * len(block)  # the last block
    assert chat.reasoning_token_count(tail, dec, "</think>") == 0
    # a marker spread over several tokens (here: byte-level pieces of a string the vocabulary lacks)
    multi = tok.encode("cat [/r] 7", add_special_tokens=False)
    assert len(tok.encode("[/r]", add_special_tokens=False)) > 1
    assert chat.reasoning_token_count(multi, dec, "[/r]") == len(tok.encode("cat [/r]", add_special_tokens=False))


@pytest.mark.parametrize("backend", ["fast", "lmeval"])
def test_generation_reads_the_answer_after_scripted_reasoning(qwen3, backend):
    from quantstudy.stages.evaluate import score_prompts, Prompt
    from quantstudy.tasks import Item, get_task

    model, tok = load_pretrained(qwen3)
    hook = ScriptedReasoning(tok).attach(model)
    if backend == "fast":
        from quantstudy.scoring.fastscore import FastScorer

        scorer = FastScorer(model, tok, batch_size=1)
    else:
        from quantstudy.scoring.lmeval_backend import LMEvalScorer

        scorer = LMEvalScorer(model, tok, batch_size=1)
    task = get_task("gsm8k")
    item = Item("test/0", {"question": "What is 3 plus 4?", "answer": "3+4=7\n#### 7"}, "q")
    on = Prompt(item, chat.render(tok, [{"role": "user", "content": "Question: What is 3 plus 4?\nAnswer:"}],
                                  {"enable_thinking": True}))
    off = Prompt(item, chat.render(tok, [{"role": "user", "content": "Question: What is 3 plus 4?\nAnswer:"}],
                                   {"enable_thinking": False}))
    try:
        r_on, = score_prompts(task, [on], scorer, 40, True)
        r_off, = score_prompts(task, [off], scorer, 40, True)
    finally:
        hook.remove()
    block = tok.encode("<think>" + ScriptedReasoning.REASONING + "</think>", add_special_tokens=False)
    answer = tok.encode(ScriptedReasoning.ANSWER, add_special_tokens=False)
    assert r_on.details["reasoning_tokens"] == len(block) and r_on.details["reasoning_closed"]
    assert r_on.details["text"].strip() == "7" and r_on.details["flexible"] == "7" and r_on.details["correct_flexible"]
    assert r_on.n_tokens == len(block) + len(answer) + (1 if backend == "fast" else 0)  # fast counts the EOS token
    assert "reasoning_tokens" not in r_off.details and r_off.details["text"].strip() == "7"


# ------------------------------------------------------------------ stages
def test_resolve_local_qwen3_dir(qwen3, tmp_path):
    out = resolve_source(str(qwen3), None, tmp_path, tmp_path / "cache")
    model, _ = load_pretrained(out)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    attn = model.model.layers[0].self_attn
    assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")  # the per-head q/k RMSNorms


def test_resolve_qwen3_gguf_gives_the_same_model_and_tokens(qwen3, tmp_path):
    """A qwen3-architecture GGUF (written with the gguf package) through resolve: same logits, same
    tokens for text holding <think> (a user-defined token), same chat template. The tiny model's
    head_dim (16) is not Qwen3Config's default (128): transformers' GGUF mapping drops it."""
    from transformers import AutoTokenizer

    from tests.tiny_qwen3 import write_qwen3_gguf

    g = write_qwen3_gguf(qwen3, tmp_path / "tiny-qwen3.gguf")
    out = resolve_source(g.name, None, tmp_path, tmp_path / "cache")
    a, ta = load_pretrained(qwen3)
    b, tb = load_pretrained(out)
    assert b.config.head_dim == a.config.head_dim == 16
    text = chat.render(ta, USER, {"enable_thinking": False}) + "<think> the cat</think> 7"
    assert tb.encode(text) == ta.encode(text) and tb.chat_template == ta.chat_template
    x = torch.tensor([ta.encode(text)])
    with torch.no_grad():
        assert torch.allclose(a(x).logits, b(x).logits, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_qwen3_quantizes_on_a_4bit_grid(qwen3, tmp_path, method):
    model, tok = load_pretrained(qwen3)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report = LayerReport()
    rows, _ = run_oneshot(model, tok, variant(method, 32), None if method == "rtn" else calib_dataset(tok), 64,
                          tmp_path / "out", report)
    reloaded, _ = load_pretrained(tmp_path / "out")
    for name, w0 in before.items():
        w = dict(reloaded.named_modules())[name].weight.detach()
        if name == "lm_head":  # ignored by default
            assert torch.equal(w, w0)
            continue
        assert levels_per_group(w, 32) <= 16 < levels_per_group(w0, 32), name
    attn = reloaded.model.layers[0].self_attn
    assert torch.equal(attn.q_norm.weight, model.model.layers[0].self_attn.q_norm.weight)  # norms stay float
    if method == "gptq":
        assert sorted(rows) == sorted(n for n in before if n != "lm_head")
    if method == "awq":
        layers = model.config.num_hidden_layers
        # Qwen3 uses llm-compressor's default mappings; with GQA the v_proj -> o_proj mapping cannot apply
        # (v_proj's output is kv_heads x head_dim wide, o_proj's input heads x head_dim): expected skips by shape
        a0 = model.model.layers[0].self_attn
        gqa = a0.v_proj.out_features != a0.o_proj.in_features
        expect = {f"model.layers.{i}.self_attn.v_proj" for i in range(layers)} if gqa else set()
        assert set(report.awq_skipped) == expect and report.awq_skipped_count == len(expect)
        assert all("incompatible" in why for why in report.awq_skipped.values())
        assert sorted(rows) == sorted(f"model.layers.{i}.{m}" for i in range(layers)
                                      for m in ("input_layernorm", "post_attention_layernorm", "mlp.up_proj"))


def test_awq_stage_records_mappings_and_calibrates_with_template_kwargs(qwen3, tmp_path):
    import hashlib

    from transformers import AutoTokenizer

    from quantstudy.runtime.context import RunContext
    from quantstudy.study import run_stage
    from quantstudy.data.conversations import load_conversations
    from quantstudy.store import ModelRecord, Store
    from quantstudy.config.variants import expand_variants

    from tests.tiny import text

    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": text(i, 12)}] + (
        [{"role": "assistant", "content": text(50 + i, 20)}] if i % 2 else [])}) + "\n" for i in range(6)))
    cfg = parse_config({"name": "t", "model": {"source": str(qwen3), "chat_template_kwargs": {"enable_thinking": False}},
                        "calibration": {"source": "jsonl", "path": str(data), "samples": 4, "max_seq_len": 48},
                        "quantize": [{"method": "awq", "group_size": 32}], "evaluate": None})
    v = expand_variants(cfg)[0]
    ctx = RunContext(cfg, tmp_path / "s", tmp_path, Store(tmp_path / "s" / "store.sqlite"), None, "cpu",
                     Console(file=io.StringIO()))
    rec = run_stage(ctx, "quantize", ModelRecord("base", "baseline", str(qwen3)), made=v.name, variant=v,
                    out_dir=tmp_path / "s" / "models" / v.name)
    m = {n: (val, info) for _, n, val, info in ctx.store.metrics(v.name)}
    layers = [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    assert m["quantize.awq_mappings_skipped"][0] == 2 and sorted(m["quantize.awq_mappings_skipped"][1]["skipped"]) == layers
    assert m["quantize.awq_mappings_applied"][0] == 6
    assert rec.spec["calibration"]["chat_template_kwargs"] == {"enable_thinking": False}
    # the calibration texts are the conversations rendered with enable_thinking=False (by hand, via transformers)
    tok = AutoTokenizer.from_pretrained(qwen3)
    pool = {c.id: c for c in load_conversations("jsonl", None, data)}
    for cid, h in ctx.store.calibration(v.name):
        conv = pool[cid]
        text = tok.apply_chat_template(conv.as_dicts(), tokenize=False, enable_thinking=False,
                                       add_generation_prompt=conv.messages[-1][0] != "assistant")
        assert hashlib.sha256(text.encode()).hexdigest() == h


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_qwen3_moe_experts_quantize(qwen3_moe, tmp_path, method):
    """transformers holds a Qwen3-MoE layer's experts fused (3-D gate_up_proj / down_proj); llm-compressor
    unfuses them into one Linear per expert for calibration, saves those, and transformers fuses the
    decompressed weights back at load time: every expert must come back on the 4-bit grid."""
    model, tok = load_pretrained(qwen3_moe)
    fused = {(i, name): getattr(layer.mlp.experts, name).detach().clone()
             for i, layer in enumerate(model.model.layers) for name in ("gate_up_proj", "down_proj")}
    n_exp = model.config.num_experts
    report = LayerReport()
    rows, _ = run_oneshot(model, tok, variant(method, 32), calib_dataset(tok), 64, tmp_path / "out", report)
    reloaded, _ = load_pretrained(tmp_path / "out")
    for (i, name), w0 in fused.items():
        w = getattr(reloaded.model.layers[i].mlp.experts, name).detach()
        for e in range(n_exp):
            assert levels_per_group(w[e], 32) <= 16 < levels_per_group(w0[e], 32), (i, name, e)
            assert 0 < ((w[e] - w0[e]).norm() / w0[e].norm()).item() < 0.5
    assert torch.equal(reloaded.model.layers[0].mlp.gate.weight, model.model.layers[0].mlp.gate.weight)  # router kept
    if method == "gptq":  # one Hessian per unfused expert projection
        assert {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(len(model.model.layers)) for e in range(n_exp)
                for p in ("gate_proj", "up_proj", "down_proj")} <= set(rows)
    else:
        assert report.awq_skipped_count == model.config.num_hidden_layers  # v_proj -> o_proj (GQA), as dense


def test_qwen3_fast_scorer_agrees_with_lmeval(qwen3):
    from quantstudy.scoring.fastscore import FastScorer
    from quantstudy.scoring.lmeval_backend import LMEvalScorer
    from quantstudy.scoring.protocol import GenRequest, LLRequest

    model, tok = load_pretrained(qwen3)
    ctxs = [chat.render(tok, [{"role": "user", "content": f"the cat sat on {w}"}], {"enable_thinking": False})
            for w in ("a mat", "two dogs", "seven red boxes")]
    reqs = [LLRequest(c, cont) for c in ctxs for cont in ("the cat", "one blue house")]
    fast = FastScorer(model, tok, batch_size=4).loglikelihood(reqs)
    ref = LMEvalScorer(model, tok, batch_size=4).loglikelihood(reqs)
    for a, b in zip(fast, ref):
        assert a.logprob == pytest.approx(b.logprob, abs=2e-4) and a.is_greedy == b.is_greedy
    gens = [GenRequest(c, ("\n\n",), 12) for c in ctxs]
    assert [g.text for g in FastScorer(model, tok, batch_size=2).generate(gens)] == \
        [g.text for g in LMEvalScorer(model, tok, batch_size=2).generate(gens)]


def test_qwen3_lora_trains_and_merges(qwen3, tmp_path):
    from quantstudy.runtime.context import RunContext
    from quantstudy.study import run_stage
    from quantstudy.store import ModelRecord, Store
    from tests.test_train import PAIRS, completion_nll, conv

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in PAIRS))
    cfg = parse_config({"name": "t", "model": {"source": str(qwen3), "chat_template_kwargs": {"enable_thinking": False}},
                        "evaluate": None,
                        "train": {"source": "jsonl", "path": str(data), "samples": 12, "batch_size": 4, "epochs": 3,
                                  "learning_rate": 5e-3, "max_seq_len": 96, "lora": {"r": 8, "alpha": 16}}})
    ctx = RunContext(cfg, tmp_path / "s", tmp_path, Store(tmp_path / "s" / "store.sqlite"), None, "cpu",
                     Console(file=io.StringIO()))
    rec = run_stage(ctx, "train", ModelRecord("base", "baseline", str(qwen3)), made="trained",
                    out_dir=tmp_path / "s" / "models" / "trained")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(rec.path)
    assert type(merged).__name__ == "Qwen3ForCausalLM" and not any("lora" in k for k in merged.state_dict())
    tok = AutoTokenizer.from_pretrained(qwen3)
    samples = [conv(i, q, a) for i, (q, a) in enumerate(PAIRS)]
    base = AutoModelForCausalLM.from_pretrained(qwen3)
    assert completion_nll(merged, tok, samples) < completion_nll(base, tok, samples) - 0.2


def test_qwen3_fidelity_matches_full_vocabulary_reference(qwen3, tmp_path):
    from quantstudy.config import FidelityConfig, ModelConfig, StudyConfig
    from quantstudy.runtime.context import RunContext
    from quantstudy.study import run_stage
    from quantstudy.store import ModelRecord, Store
    from tests.tiny import text

    model, tok = load_pretrained(qwen3)
    run_oneshot(model, tok, variant("rtn", 32), None, 0, tmp_path / "rtn")
    (tmp_path / "t.txt").write_text(text(5, 300))
    vocab = load_pretrained(qwen3)[0].config.vocab_size
    fcfg = FidelityConfig(source=str(tmp_path / "t.txt"), tokens=200, context_length=64, top_k=vocab)
    cfg = StudyConfig(name="t", model=ModelConfig(source=str(qwen3)), fidelity=fcfg)
    ctx = RunContext(cfg, tmp_path, tmp_path, Store(tmp_path / "store.sqlite"), None, "cpu", Console(quiet=True))
    run_stage(ctx, "fidelity", ModelRecord("rtn", "quantized", str(tmp_path / "rtn")),
              parent=ModelRecord("base", "baseline", str(qwen3)))
    m = {n.removeprefix("fidelity."): v for _, n, v, _ in ctx.store.metrics("rtn") if n.startswith("fidelity.")}
    # reference: whole 64-token windows through the full models, float64 KL over the whole vocabulary
    from transformers import AutoModelForCausalLM

    ids = tok(text(5, 300))["input_ids"][:200]
    p_m, q_m = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval() for d in (qwen3, tmp_path / "rtn"))
    kl = []
    with torch.no_grad():
        for first in range(1, len(ids), 64):
            stop = min(first + 64, len(ids))
            x = torch.tensor([ids[max(0, stop - 1 - 64):stop - 1]])
            lp = torch.log_softmax(p_m(x).logits[0, -(stop - first):], -1)
            lq = torch.log_softmax(q_m(x).logits[0, -(stop - first):], -1)
            kl.append((lp.exp() * (lp - lq)).sum(-1))
    kl = torch.cat(kl)
    assert m["n_tokens"] == len(kl) == 199
    assert m["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-3, abs=1e-7) and m["kl_mean"] > 1e-6


# ------------------------------------------------------------------ large vocabulary: bounded buffers
PEAK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import quantstudy.stages.fidelity as fid
    import quantstudy.scoring.divergence as div
    from rich.console import Console
    from quantstudy.config import FidelityConfig, ModelConfig, StudyConfig
    from quantstudy.runtime.context import RunContext
    from quantstudy.store import ModelRecord, Store
    if {floats} is not None:
        div.HEAD_FLOATS = {floats}
    def hwm():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    d, tmp = Path({model!r}), Path({tmp!r})
    fcfg = FidelityConfig(source={text!r}, tokens=1024, context_length=512, top_k=256)
    ctx = RunContext(StudyConfig(name="t", model=ModelConfig(source=str(d)), fidelity=fcfg), tmp, tmp,
                     Store(tmp / "store.sqlite"), None, "cpu", Console(quiet=True))
    import torch, transformers
    m, _ = fid._load(str(d), ctx)  # warm the import and allocator paths before the baseline reading
    with torch.inference_mode():
        m(input_ids=torch.tensor([[1, 2, 3]]))
    del m
    before = hwm()
    from quantstudy.study import run_stage
    run_stage(ctx, "fidelity", ModelRecord("v", "quantized", str(d)), parent=ModelRecord("base", "baseline", str(d)))
    kl = [v for _, n, v, _ in ctx.store.metrics("v") if n == "fidelity.kl_mean"][0]
    print(json.dumps({{"before": before, "after": hwm(), "kl": kl}}))
""")


def _fidelity_peak(model: Path, tmp: Path, text: Path, floats: int | None) -> dict:
    tmp.mkdir()
    code = PEAK.format(root=str(ROOT / "src"), floats=floats, model=str(model), tmp=str(tmp), text=str(text))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_fidelity_log_probs_come_in_bounded_chunks_at_qwen3_vocabulary(tmp_path, monkeypatch):
    import quantstudy.scoring.divergence as div
    import quantstudy.stages.fidelity as fid
    from tests.tiny import text

    d = make_tiny_qwen3(tmp_path / "big", hidden=32, layers=1, vocab_size=QWEN3_VOCAB)
    model, tok = load_pretrained(d)
    ids = fid.tokenize(tok, text(3, 600), 300)
    wins = div.windows(len(ids), 128, 128)
    monkeypatch.setattr(div, "HEAD_FLOATS", 40 * QWEN3_VOCAB)  # 40 positions per chunk (the default: 110)
    chunks = list(div.window_logprobs(model, ids, wins, "cpu"))
    assert all(lp.numel() <= div.HEAD_FLOATS and lp.shape[1] == QWEN3_VOCAB for _, _, lp in chunks)
    assert [(a, b) for a, b, _ in chunks][:4] == [(1, 41), (41, 81), (81, 121), (121, 129)]
    assert sum(b - a for a, b, _ in chunks) == len(ids) - 1  # every target once
    with torch.no_grad():  # reference: the whole model's logits on each whole window
        want = torch.cat([torch.log_softmax(model(input_ids=torch.as_tensor(ids[b:e - 1])[None]).logits[0, f - 1 - b:], -1)
                          for b, f, e in wins])
    got = torch.cat([lp for _, _, lp in chunks])
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.slow  # two fresh interpreters (~40 s): a measurement, the chunking itself is checked above
def test_fidelity_peak_memory_is_bounded_at_qwen3_vocabulary(tmp_path):
    from tests.tiny import text

    model = make_tiny_qwen3(tmp_path / "big", hidden=64, layers=1, vocab_size=QWEN3_VOCAB)
    (tmp_path / "t.txt").write_text(text(3, 2000))
    chunked = _fidelity_peak(model, tmp_path / "a", tmp_path / "t.txt", None)
    whole = _fidelity_peak(model, tmp_path / "b", tmp_path / "t.txt", 1 << 40)  # one chunk per window: the old way
    grow_chunked, grow_whole = chunked["after"] - chunked["before"], whole["after"] - whole["before"]
    print(f"peak RSS growth during fidelity at vocab {QWEN3_VOCAB}: chunked {grow_chunked / 2**20:.0f} MiB, "
          f"whole windows {grow_whole / 2**20:.0f} MiB")
    window = 512 * QWEN3_VOCAB * 4  # one float32 [512, vocab] buffer: 311 MB
    assert grow_whole > 2 * window  # the test can fail: whole windows hold several such buffers
    # chunked: below one whole-window buffer, though the growth also holds two loaded models (2 x 78 MB)
    assert grow_chunked < window
    assert chunked["kl"] == pytest.approx(whole["kl"], abs=1e-9)  # same numbers either way (model vs itself)


# ------------------------------------------------------------------ a study, thinking on vs off
def test_thinking_on_vs_off_in_one_study(qwen3, tmp_path, monkeypatch, shared_data):
    """A tiny Qwen3 evaluated on GSM8K twice (enable_thinking true / false as two task entries).
    The random model never closes a <think> block on its own, so ScriptedReasoning injects one
    (and, for some prompts, reasoning that runs into the token cap); the rest is the real stage."""
    from typer.testing import CliRunner

    import quantstudy.runtime.modeldir as models
    from quantstudy.cli import app
    from quantstudy.store import Store

    real = models.load_pretrained
    long = lambda prompt: len(prompt) % 3 == 0  # noqa: E731  some prompts reason until the cap

    def scripted(*a, **k):
        model, tok = real(*a, **k)
        ScriptedReasoning(tok, long).attach(model)
        return model, tok

    monkeypatch.setattr(models, "load_pretrained", scripted)
    cfg = {"name": "think", "output_dir": "out", "data_dir": str(shared_data), "model": {"source": str(qwen3)},
           "quantize": [],
           "evaluate": {"tasks": [{"name": "gsm8k", "alias": "gsm8k-think", "chat_template_kwargs": {"enable_thinking": True}},
                                  {"name": "gsm8k", "chat_template_kwargs": {"enable_thinking": False}}],
                        "limit": 6, "num_fewshot": 0, "chat_template": True, "batch_size": 1, "max_new_tokens": 24,
                        "speed": None}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["run", str(tmp_path / "s.yaml"), "--format", "md,json"])
    assert r.exit_code == 0, r.output
    with Store(tmp_path / "out" / "store.sqlite") as s:
        on = [rec for _, rec in s.items("base", "gsm8k-think")]
        off = [rec for _, rec in s.items("base", "gsm8k")]
    tok = load_pretrained(qwen3)[1]
    block = len(tok.encode("<think>" + ScriptedReasoning.REASONING + "</think>", add_special_tokens=False))
    assert len(on) == len(off) == 6 and all("reasoning_tokens" not in x.details for x in off)
    capped = [x for x in on if x.details["reasoning_hit_max"]]
    done = [x for x in on if not x.details["reasoning_hit_max"]]
    assert capped and done, "the scripted prompts give both finished and capped reasoning"
    assert all(x.details["reasoning_tokens"] == block and x.details["text"].strip() == "7" for x in done)
    assert all(x.details["reasoning_tokens"] == 24 and x.details["text"] == "" and x.hit_max for x in capped)
    assert all(x.details["task_name"] == "gsm8k" for x in on)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "gsm8k-think" in md and "mean reasoning tokens" in md and "'7'" in md
    share = f"{len(capped) / 6:.0%}"
    assert share in md
    assert "enable_thinking" in md  # the technical details name the template arguments


# ------------------------------------------------------------------ the original studies' files
@pytest.mark.parametrize("study", ["seed-000.yaml", "qwen3-4b-gptq-awq.yaml"])
def test_original_qwen3_studies_plan_offline(study, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from quantstudy.cli import app
    from quantstudy.config import load_config

    src = ROOT / "studies" / study
    cfg = load_config(src)
    assert cfg.model.chat_template_kwargs == {"enable_thinking": False}
    data = yaml.safe_load(src.read_text())
    data["output_dir"] = str(tmp_path / "out")  # the real file's output_dir is outside tmp
    (tmp_path / study).write_text(yaml.safe_dump(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(app, ["plan", str(tmp_path / study)])
    assert r.exit_code == 0, r.output
    assert "will run" in r.output and "Hugging Face hub" in r.output and cfg.model.source in r.output
