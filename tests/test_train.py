"""SFT stage: loss goes down, completion-only masking, data readers, held-out guard, LoRA merge."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from quantstudy.stages import train, train_head
from quantstudy.data import heldout, train_data
from quantstudy.config import TrainConfig, parse_config
from quantstudy.runtime.context import RunContext
from quantstudy.errors import QuantStudyError
from quantstudy.data.conversations import Conversation
from quantstudy.store import ModelRecord, Store
from quantstudy.study import run_stage

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
PAIRS = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in
         [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3), (9, 9), (5, 5), (3, 7), (2, 2)]]


def conv(i: int, q: str, a: str) -> Conversation:
    return Conversation(f"t:{i}", (("user", q), ("assistant", a)))


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE with ChatML specials, trained here (no download, < 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([q + " " + a for q, a in PAIRS] * 4 + ["user assistant system Question Answer"],
                            trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<|im_start|>",
                                eos_token="<|im_end|>", pad_token="<|im_end|>")
    t.chat_template = CHATML
    return t


def tiny_model(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def completion_nll(model, tok, samples: list[Conversation]) -> float:
    """Mean NLL (nats/token) of the replies given the chat-rendered prompts, in float64 by hand."""
    total, n = 0.0, 0
    model.eval()
    for c in samples:
        prompt = tok.apply_chat_template(c.as_dicts()[:-1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(c.as_dicts(), tokenize=False)
        ids = tok(full, add_special_tokens=False, return_tensors="pt").input_ids
        start = len(tok(prompt, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        tgt = ids[0, start:]
        total -= logp[start - 1:-1].gather(1, tgt[:, None]).sum().item()
        n += len(tgt)
    return total / n


# ----------------------------------------------------------------------------- training
def test_tiny_model_full_finetune_loss_goes_down(tok, tmp_path):
    samples = [conv(i, q, a) for i, (q, a) in enumerate(PAIRS)]
    cfg = TrainConfig(samples=12, method="full", batch_size=4, max_steps=15, learning_rate=3e-3, max_seq_len=64)
    model = tiny_model(tok)
    before = completion_nll(model, tok, samples)
    trainer = train.run_sft(model, tok, samples, cfg, train.sft_args(cfg, tmp_path / "o", "cpu"), None)
    curve = train.loss_curve(trainer)
    assert [s for s, _ in curve] == list(range(1, 16))
    assert curve[-1][1] < curve[0][1] - 0.5
    assert completion_nll(trainer.model, tok, samples) < before - 0.5


def test_train_model_lora_merged_saved_and_recorded(tok, tmp_path):
    base_dir = tmp_path / "base"
    tiny_model(tok, seed=1).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in PAIRS))
    cfg = parse_config({"name": "t", "model": {"source": str(base_dir)}, "evaluate": None,
                        "train": {"source": "jsonl", "path": str(data), "samples": 12, "batch_size": 4,
                                  "epochs": 3, "learning_rate": 5e-3, "max_seq_len": 64,
                                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}})
    store = Store(tmp_path / "study" / "store.sqlite")
    ctx = RunContext(cfg, tmp_path / "study", tmp_path, store, None, "cpu", quiet())
    base = ModelRecord("base", "baseline", str(base_dir))
    rec = run_stage(ctx, "train", base, made="trained", out_dir=tmp_path / "study" / "models" / "trained")

    out = Path(rec.path)
    assert rec.role == "trained" and rec.parent == "base" and rec.spec["steps"] == 9
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.parent.glob("trained.*.tmp"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in reloaded.state_dict())  # merged, plain Llama weights
    samples = [conv(i, q, a) for i, (q, a) in enumerate(PAIRS)]
    assert completion_nll(reloaded, tok, samples) < completion_nll(tiny_model(tok, seed=1), tok, samples) - 0.2

    curve = store.series("trained", "loss")
    metrics = {n: v for _, n, v, _ in store.metrics("trained")}
    assert len(curve) == 9 and metrics["train.final_loss"] == pytest.approx(curve[-1][1])
    assert metrics["train.seconds"] > 0 and metrics["train.peak_rss_bytes"] > 10e6
    # non-padding tokens seen = 3 epochs x the rendered length of every sample (independent count)
    expect = 3 * sum(len(tok(tok.apply_chat_template(s.as_dicts(), tokenize=False), add_special_tokens=False)
                         .input_ids) for s in samples)
    assert metrics["train.tokens"] == expect


def test_lora_trained_on_bf16_base_merges_into_float32_weights(tok, tmp_path):
    """With bf16 the frozen base trains in bf16; the merged model is the float32 base plus
    (alpha / r) * B @ A, computed here by hand in float64 from the trained adapter."""
    from peft import get_peft_model_state_dict

    if not train.bf16_supported("cpu"):
        # without native bf16 matmuls (e.g. an AVX2-only CPU) the option trains in float32 and the
        # adapter is merged in place, so there is no bf16 path to check here
        pytest.skip("this CPU has no native bf16 matmuls: bf16_autocast trains in float32 here")
    tiny_model(tok, seed=3).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cfg = TrainConfig(samples=4, batch_size=2, max_steps=2, learning_rate=1e-2, max_seq_len=64,
                      lora={"r": 4, "alpha": 8}, bf16_autocast=True)
    samples = [conv(i, q, a) for i, (q, a) in enumerate(PAIRS[:4])]
    trainer, merged, _ = train.fit(tmp_path / "base", samples, cfg, "cpu", None, tmp_path / "w")
    assert trainer.args.bf16 == train.bf16_supported("cpu")
    if trainer.args.bf16:
        assert trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    adapter = get_peft_model_state_dict(trainer.model)
    base32 = tiny_model(tok, seed=3).state_dict()
    merged_sd = merged.state_dict()
    assert all(v.dtype == torch.float32 for v in merged_sd.values())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a = adapter[f"base_model.model.{name}.lora_A.weight"].double()
        b = adapter[f"base_model.model.{name}.lora_B.weight"].double()
        assert b.abs().max() > 0  # the adapter did train
        expect = base32[f"{name}.weight"].double() + (8 / 4) * b @ a
        torch.testing.assert_close(merged_sd[f"{name}.weight"].double(), expect, rtol=0, atol=1e-6)


def test_killed_training_resumes_from_its_checkpoint(tok, tmp_path, monkeypatch):
    """A run killed after step 5 of 8 resumes from checkpoint-4 and ends with the same weights
    and loss curve as an uninterrupted run (data order, dropout RNG and optimizer restored)."""
    from safetensors.torch import load_file

    base_dir = tmp_path / "base"
    tiny_model(tok, seed=2).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in PAIRS[:8]))
    cfg = parse_config({"name": "t", "model": {"source": str(base_dir)}, "evaluate": None,
                        "train": {"source": "jsonl", "path": "d.jsonl", "samples": 8, "batch_size": 2,
                                  "epochs": 2, "learning_rate": 5e-3, "max_seq_len": 64}})
    base = ModelRecord("base", "baseline", str(base_dir))

    def run(study: Path) -> tuple[dict, list, dict]:
        ctx = RunContext(cfg, study, tmp_path, Store(study / "s.sqlite"), None, "cpu", quiet())
        rec = run_stage(ctx, "train", base, made="trained", out_dir=study / "trained")
        info = {n: i for _, n, _, i in ctx.store.metrics("trained")}["train.seconds"]
        return load_file(Path(rec.path) / "model.safetensors"), ctx.store.series("trained", "loss"), info

    straight, straight_curve, info = run(tmp_path / "a")
    assert info["resumed_from"] is None
    original = train.RichProgress.on_step_end

    def killed_at_5(self, args, state, control, **kw):
        if state.global_step == 5:
            raise KeyboardInterrupt("simulated kill")
        original(self, args, state, control, **kw)

    monkeypatch.setattr(train.RichProgress, "on_step_end", killed_at_5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    assert [p.name for p in (tmp_path / "b/cache").glob("sft-*/checkpoint-*")] == ["checkpoint-4"]
    monkeypatch.setattr(train.RichProgress, "on_step_end", original)
    resumed, resumed_curve, info = run(tmp_path / "b")
    assert info["resumed_from"] == "checkpoint-4"
    assert [s for s, _ in resumed_curve] == list(range(1, 9))
    assert [v for _, v in resumed_curve] == pytest.approx([v for _, v in straight_curve], rel=1e-5)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k])
    assert not list((tmp_path / "b/cache").glob("sft-*"))  # checkpoints removed after success


def test_completion_only_masking_hand_made(tok, tmp_path):
    """Prompt tokens get label -100; exactly the reply (and its end-of-turn) carry the loss."""
    from trl import SFTTrainer

    sample = conv(0, "What is 2 plus 2?", "2 plus 2 is 4.")
    for chat in (True, False):
        cfg = TrainConfig(samples=1, chat_template=chat, max_steps=1, max_seq_len=64)
        from datasets import Dataset

        trainer = SFTTrainer(model=tiny_model(tok), args=train.sft_args(cfg, tmp_path / "o", "cpu"),
                             train_dataset=Dataset.from_list(train_data.as_records([sample], chat)),
                             processing_class=tok)
        row = trainer.train_dataset[0]
        ids, labels = row["input_ids"], row["labels"]
        if chat:
            prompt = "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n"
            reply = "2 plus 2 is 4.<|im_end|>\n"
        else:
            prompt, reply = "Question: What is 2 plus 2?\nAnswer:", " 2 plus 2 is 4.<|im_end|>"
        n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
        assert tok.decode(ids) == prompt + reply
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[n_prompt:]) == reply

        # The trainer's loss equals a float64 cross-entropy over the reply tokens only.
        batch = trainer.data_collator([row])
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch).item()
            logp = torch.log_softmax(trainer.model(torch.tensor([ids])).logits[0].double(), -1)
        tgt = torch.tensor(ids[n_prompt:])
        ref = -logp[n_prompt - 1:-1].gather(1, tgt[:, None]).mean().item()
        assert loss == pytest.approx(ref, rel=2e-3)


def test_one_row_per_forward_same_update_as_one_padded_forward(tok, tmp_path):
    """Rows run one per forward pass (gradients accumulated) must give the update of one padded
    forward over the same rows: the loss is divided by the whole batch's reply tokens, not averaged
    per forward. Replies of very different lengths make a per-forward mean visibly wrong; plain SGD
    without clipping makes the update the gradient itself."""
    long = " ".join(["and then it adds one more."] * 3)
    samples = [conv(0, "What is 1 plus 2?", "3."), conv(1, "What is 3 plus 4?", "7."),
               conv(2, "What is 5 plus 6?", f"11, {long}"), conv(3, "What is 7 plus 8?", f"15, {long}")]
    init = {n: p.detach().clone() for n, p in tiny_model(tok, seed=5).named_parameters()}
    before = completion_nll(tiny_model(tok, seed=5), tok, samples)  # float64, by hand
    deltas, losses = {}, {}
    for rows in (4, 1):
        cfg = TrainConfig(samples=4, method="full", batch_size=4, max_steps=1, learning_rate=1.0, max_seq_len=128,
                          lr_scheduler="constant", rows_per_forward=rows)
        args = train.sft_args(cfg, tmp_path / f"o{rows}", "cpu", optim="sgd", warmup_steps=0, max_grad_norm=0.0)
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (rows, 4 // rows)
        trainer = train.run_sft(tiny_model(tok, seed=5), tok, samples, cfg, args, None)
        losses[rows] = train.loss_curve(trainer)[0][1]
        deltas[rows] = {n: p.detach() - init[n] for n, p in trainer.model.named_parameters()}
    assert losses[4] == pytest.approx(before, rel=1e-4)
    assert losses[1] == pytest.approx(before, rel=1e-4)
    assert max(d.abs().max().item() for d in deltas[4].values()) > 1e-3  # the step did move the weights
    for n in deltas[4]:
        torch.testing.assert_close(deltas[1][n], deltas[4][n], rtol=1e-4, atol=1e-6)


def test_rows_per_forward_same_batches_and_clear_error(tok, tmp_path):
    """The random sampler's order does not depend on the batch size: one row per forward sees the
    same rows in each optimizer step as one forward of 4."""
    with pytest.raises(ValueError, match="rows_per_forward 3 does not divide batch_size x grad_accum = 8"):
        TrainConfig(batch_size=8, rows_per_forward=3)
    assert TrainConfig().forward_rows("cpu") == 1 and TrainConfig(batch_size=6).forward_rows("cuda") == 6
    samples = [conv(i, q, a) for i, (q, a) in enumerate(PAIRS[:8])]
    steps = {}
    for rows in (4, 1):
        cfg = TrainConfig(samples=8, batch_size=4, max_steps=2, max_seq_len=64, rows_per_forward=rows)
        trainer = train.run_sft(tiny_model(tok), tok, samples, cfg, train.sft_args(cfg, tmp_path / f"b{rows}", "cpu"),
                                None)
        loader = trainer.get_train_dataloader()
        ids = [tuple(map(tuple, b["input_ids"].tolist())) for b in loader]
        flat = [row for b in ids for row in b]
        steps[rows] = [sorted(tuple(t for t in r if t != tok.pad_token_id) for r in flat[i:i + 4]) for i in (0, 4)]
    assert steps[1] == steps[4]


def test_head_on_labelled_positions_same_loss_and_gradients(tok, tmp_path, monkeypatch):
    """TRL's CPU path projects every position; the compact one only labelled positions (prompt and
    padding skipped) and must give the same loss and gradients."""
    import trl.kernels.chunked_logprob as kernel
    from datasets import Dataset
    from trl import SFTTrainer

    samples = [conv(0, "What is 2 plus 2?", "2 plus 2 is 4."), conv(1, "What is 12 plus 30?", "It is 42, since 12 plus 30 is 42.")]
    cfg = TrainConfig(samples=2, max_steps=1, max_seq_len=64)
    trainer = SFTTrainer(model=tiny_model(tok), args=train.sft_args(cfg, tmp_path / "o", "cpu"),
                         train_dataset=Dataset.from_list(train_data.as_records(samples, True)), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert labelled < batch["labels"][:, 1:].numel()  # the batch has prompt and padding positions
    rows: list[tuple[str, int]] = []
    apply, dense = kernel.ChunkedLogProbFunction.apply, train_head.dense_logprobs
    monkeypatch.setattr(kernel.ChunkedLogProbFunction, "apply",
                        lambda h, *a: rows.append(("trl", h.shape[0])) or apply(h, *a))
    monkeypatch.setattr(train_head, "dense_logprobs", lambda h, *a: rows.append(("dense", h.shape[0])) or dense(h, *a))

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]

    full_loss, full_grads = loss_and_grads()
    with train.head_on_labelled_positions():
        compact_loss, compact_grads = loss_and_grads()
    assert rows == [("trl", batch["labels"][:, 1:].numel()), ("dense", labelled)]
    assert compact_loss == pytest.approx(full_loss, rel=1e-6)
    assert len(compact_grads) == len(full_grads) > 0
    for a, b in zip(compact_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_full_sequence_loss_when_completion_only_is_off(tok, tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    cfg = TrainConfig(samples=1, completion_only_loss=False, max_steps=1, max_seq_len=64)
    trainer = SFTTrainer(model=tiny_model(tok), args=train.sft_args(cfg, tmp_path / "o", "cpu"),
                         train_dataset=Dataset.from_list(train_data.as_records([conv(0, "Hi?", "Hello.")], True)),
                         processing_class=tok)
    row = trainer.train_dataset[0]
    assert row["labels"] == row["input_ids"]


def test_missing_chat_template_is_a_clear_error(tok, tmp_path):
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>")
    cfg = TrainConfig(samples=1, max_steps=1)
    with pytest.raises(QuantStudyError, match="train.chat_template"):
        train.run_sft(tiny_model(tok), plain, [conv(0, "a", "b")], cfg, train.sft_args(cfg, tmp_path, "cpu"), None)


# ----------------------------------------------------------------------------- data
def test_readers_on_offline_data(shared_data, tmp_path):
    omi = train_data.load_pool(TrainConfig(), shared_data, tmp_path)
    raw = json.loads((shared_data / "openmathinstruct-2/openmathinstruct-2-train.json").read_text())
    assert len(omi) == len(raw) == 1000
    assert omi[0].messages == (("user", raw[0]["problem"]), ("assistant", raw[0]["generated_solution"]))
    gsm = train_data.load_pool(TrainConfig(source="gsm8k"), shared_data, tmp_path)
    first = json.loads((shared_data / "gsm8k/train.jsonl").open().readline())
    assert len(gsm) == 7473 and gsm[0].messages == (("user", first["question"]), ("assistant", first["answer"]))
    # The offline ShareGPT file keeps only the first human turn: nothing to learn from.
    with pytest.raises(QuantStudyError, match="assistant reply"):
        train_data.load_pool(TrainConfig(source="sharegpt"), shared_data, tmp_path)


def test_local_jsonl_shapes_and_relative_path(tmp_path):
    rows = [{"prompt": "p1", "response": "r1"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}, {"role": "user", "content": "dangling"}]},
            {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]},
            {"messages": [{"role": "user", "content": "no reply"}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = train_data.load_pool(TrainConfig(source="jsonl", path="d.jsonl"), None, tmp_path)
    assert [c.messages for c in pool] == [(("user", "p1"), ("assistant", "r1")),
                                          (("system", "s"), ("user", "u"), ("assistant", "a")),
                                          (("user", "h"), ("assistant", "g"))]
    recs = train_data.as_records(pool, chat=True)
    assert recs[1]["completion"] == [{"role": "assistant", "content": "a"}] and len(recs[1]["prompt"]) == 2


def test_config_rejects_jsonl_without_path_and_unknown_scheduler():
    with pytest.raises(QuantStudyError, match="train.*path"):
        parse_config({"name": "s", "model": {"source": "a/b"}, "train": {"source": "jsonl"}})
    with pytest.raises(QuantStudyError, match="lr_scheduler"):
        parse_config({"name": "s", "model": {"source": "a/b"}, "train": {"lr_scheduler": "cosine_typo"}})


# ----------------------------------------------------------------------------- held-out guard
def test_guard_raises_naming_the_items():
    h = train_data.text_hash
    train_set = {h("What is 2+2?"): "omi2-7", h("Name a prime."): "omi2-9"}
    evaluated = {h("  what IS 2+2? "): "gsm8k/test-12", h("Unrelated"): "arc_easy/Mercury_1"}
    with pytest.raises(QuantStudyError) as e:
        heldout.guard_overlap(train_set, evaluated)
    assert "gsm8k/test-12" in str(e.value) and "omi2-7" in str(e.value) and "Mercury_1" not in str(e.value)
    heldout.guard_overlap(train_set, {h("Unrelated"): "arc_easy/Mercury_1"})  # disjoint: fine


def test_selection_holds_out_evaluated_items_and_repeats():
    pool = [conv(i, f"question {i % 40}", f"answer {i}") for i in range(50)]  # 10 repeated prompts
    evaluated = {train_data.text_hash(f"question {i}") for i in range(5)}
    chosen, held_out = train_data.select_samples(pool, 35, seed=3, exclude=evaluated)
    prompts = [c.messages[0][1] for c in chosen]
    assert held_out == 10 and len(set(prompts)) == 35
    assert not {f"question {i}" for i in range(5)} & set(prompts)
    assert chosen == train_data.select_samples(pool, 35, seed=3, exclude=evaluated)[0]
    assert chosen != train_data.select_samples(pool, 35, seed=4, exclude=evaluated)[0]
    with pytest.raises(QuantStudyError, match="train.samples"):
        train_data.select_samples(pool, 36, seed=3, exclude=evaluated)


def test_plan_samples_user_file_overlapping_evaluation_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "What is 2+2?", "response": "4"}) + "\n")
    cfg = parse_config({"name": "t", "model": {"source": "a/b"},
                        "train": {"source": "jsonl", "path": "d.jsonl", "samples": 1}})
    monkeypatch.setattr(heldout, "evaluated_hashes", lambda cfg, data_dir: {train_data.text_hash("what is 2+2?"): "gsm8k/q1"})
    with pytest.raises(QuantStudyError, match="gsm8k/q1"):
        heldout.plan_samples(cfg, None, tmp_path)


def test_plan_samples_holds_out_evaluated_items_of_the_same_data(shared_data, tmp_path):
    """Offline OpenMathInstruct-2 is both the training pool and an evaluated task: the first 30
    evaluated problems never reach training; calibration reuses exactly these samples."""
    cfg = parse_config({"name": "t", "model": {"source": "a/b"}, "train": {"samples": 200},
                        "evaluate": {"tasks": [{"name": "openmathinstruct2", "limit": 30}], "speed": None}})
    samples, held_out = heldout.plan_samples(cfg, shared_data, tmp_path)
    raw = json.loads((shared_data / "openmathinstruct-2/openmathinstruct-2-train.json").read_text())
    evaluated = {" ".join(r["problem"].split()) for r in raw[:30]}
    assert len(samples) == 200 and held_out >= 30
    assert not evaluated & {" ".join(c.messages[0][1].split()) for c in samples}
    assert [c.id for c in heldout.plan_samples(cfg, shared_data, tmp_path)[0]] == [c.id for c in samples]  # deterministic


def test_user_file_with_an_evaluated_question_names_it(shared_data, tmp_path):
    q = json.loads((shared_data / "gsm8k/test.jsonl").open().readline())["question"]
    rows = [{"prompt": "Unrelated question?", "response": "ok"}, {"prompt": q.upper(), "response": "42"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = parse_config({"name": "t", "model": {"source": "a/b"},
                        "train": {"source": "jsonl", "path": "d.jsonl", "samples": 2},
                        "evaluate": {"tasks": [{"name": "gsm8k", "limit": 5}], "speed": None}})
    with pytest.raises(QuantStudyError, match=r"1 training samples are evaluation items: gsm8k/test/0"):
        heldout.plan_samples(cfg, shared_data, tmp_path)


# ----------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_lora_trains_merges_and_evaluates(smollm2_dir, shared_data, tmp_path):
    """LoRA SFT of SmolLM2-135M on 32 OpenMathInstruct-2 samples (4 steps); the merged model
    reloads and its completion perplexity on 16 held-out rows stays finite and does not degrade."""
    from quantstudy.runtime.modeldir import load_pretrained

    cfg = parse_config({"name": "t", "model": {"source": str(smollm2_dir)}, "evaluate": None,
                        "train": {"samples": 32, "max_steps": 4}})
    ctx = RunContext(cfg, tmp_path, tmp_path, Store(tmp_path / "s.sqlite"), shared_data, "cpu", quiet())
    rec = run_stage(ctx, "train", ModelRecord("base", "baseline", str(smollm2_dir)), made="trained", out_dir=tmp_path / "models" / "trained")
    used = {c.id for c in heldout.plan_samples(cfg, shared_data, tmp_path)[0]}
    held = [c for c in train_data.load_pool(cfg.train, shared_data, tmp_path) if c.id not in used][:16]
    base_m, tok = load_pretrained(smollm2_dir)
    trained_m, _ = load_pretrained(Path(rec.path))
    nll_base, nll_trained = completion_nll(base_m, tok, held), completion_nll(trained_m, tok, held)
    print(f"held-out completion NLL base {nll_base:.4f} trained {nll_trained:.4f}")
    assert math.isfinite(nll_trained) and math.exp(nll_trained) < 20
    assert nll_trained < nll_base + 0.02
    assert len(ctx.store.series("trained", "loss")) == 4
