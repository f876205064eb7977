"""Tiny random Qwen3 models (dense and MoE) with a byte-level BPE tokenizer and Qwen3's real chat
template, built inside the tests (no network).

The template is the one TRL ships as `trl/chat_templates/qwen3.jinja` (a copy of Qwen/Qwen3-*'s
tokenizer_config.json template): with `enable_thinking=False` it pre-fills an empty
`<think>\\n\\n</think>\\n\\n` block after the generation prompt. `<think>` and `</think>` are added
as ordinary (non-special) tokens, as in Qwen3's tokenizer, so decoding keeps them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tests.tiny import text

QWEN3_VOCAB = 151_936  # Qwen3-0.6B/4B config.json vocab_size


def qwen3_template() -> str:
    return (resources.files("trl") / "chat_templates" / "qwen3.jinja").read_text(encoding="utf-8")


def make_qwen3_tokenizer() -> object:
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text(s) for s in range(3)], vocab_size=320,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    tok.chat_template = qwen3_template()
    return tok


def make_tiny_qwen3(root: Path, hidden: int = 64, layers: int = 2, intermediate: int = 128, seed: int = 0,
                    moe: bool = False, vocab_size: int | None = None) -> Path:
    """Save a random Qwen3ForCausalLM (or Qwen3MoeForCausalLM) + tokenizer under root; return it.

    GQA (4 query heads, 2 key/value heads) and per-head q/k RMSNorms, as the real models;
    `vocab_size` larger than the tokenizer's (e.g. QWEN3_VOCAB) gives the real LM-head shape.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = make_qwen3_tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                  max_position_embeddings=512, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  bos_token_id=None, tie_word_embeddings=False)
    if moe:
        cfg = Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate // 2,
                             decoder_sparse_step=1, mlp_only_layers=[])
        model = Qwen3MoeForCausalLM(cfg).eval()
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common)).eval()
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


class ScriptedReasoning:
    """Makes a loaded model's greedy choice follow a script, on top of its own logits.

    A tiny random model never closes a `<think>` block, so the thinking-aware scoring would only
    ever see unfinished reasoning. This forward hook adds a large bonus to the logit of the next
    scripted token, chosen from the prompt: after Qwen3's pre-filled empty block (thinking off)
    the script is ANSWER; otherwise "<think>" + REASONING + "</think>" + ANSWER, and for prompts
    that `long_reasoning(prompt)` picks, reasoning that never ends (it runs into max_new_tokens).
    Everything downstream (generation loop, stop strings, extraction, token counts, store, report)
    is the real code. Batch size 1 only: the hook follows one sequence through the KV cache.
    """

    REASONING = " the cat sat on the mat"
    ANSWER = " 7"

    def __init__(self, tok, long_reasoning=lambda prompt: False):
        self.tok, self.long = tok, long_reasoning
        self.script: list[int] = []
        self.pos = 0

    def plan(self, prompt: str) -> list[int]:
        enc = lambda s: self.tok.encode(s, add_special_tokens=False)  # noqa: E731
        if prompt.endswith("</think>\n\n"):
            return enc(self.ANSWER) + [self.tok.eos_token_id]
        if self.long(prompt):
            return enc("<think>") + enc(self.REASONING) * 200
        return enc("<think>") + enc(self.REASONING) + enc("</think>") + enc(self.ANSWER) + [self.tok.eos_token_id]

    def __call__(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if ids is None or output.logits.shape[-2] == 0:
            return output
        if ids.shape[0] != 1:
            raise AssertionError("ScriptedReasoning follows one sequence: use batch_size 1")
        if ids.shape[1] > 1:  # prefill: a new prompt
            self.script, self.pos = self.plan(self.tok.decode(ids[0])), 0
        if self.pos < len(self.script):
            output.logits[0, -1, self.script[self.pos]] += 1e4
        self.pos += 1
        return output

    def attach(self, model):
        return model.register_forward_hook(self, with_kwargs=True)


def write_qwen3_gguf(model_dir: Path, path: Path) -> Path:
    """Write a saved tiny Qwen3 as a float32 GGUF of architecture `qwen3`, with llama.cpp's tensor
    names and its `gpt2` (byte-level BPE) tokenizer metadata, using the `gguf` package's writer
    (the layout llama.cpp's convert_hf_to_gguf.py produces for Qwen3; no q/k permutation for qwen)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    w = load_file(str(model_dir / "model.safetensors"))
    wr = gguf.GGUFWriter(str(path), "qwen3")
    wr.add_context_length(cfg.max_position_embeddings)
    wr.add_block_count(cfg.num_hidden_layers)
    wr.add_feed_forward_length(cfg.intermediate_size)
    wr.add_embedding_length(cfg.hidden_size)
    wr.add_head_count(cfg.num_attention_heads)
    wr.add_head_count_kv(cfg.num_key_value_heads)
    wr.add_key_length(cfg.head_dim)
    wr.add_value_length(cfg.head_dim)
    wr.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    wr.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                          else float(cfg.rope_theta))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("qwen2")
    wr.add_token_list([t for t, _ in vocab])
    special, added = set(tok.all_special_ids), set(tok.get_added_vocab().values())
    # as Qwen3's GGUF: specials are control tokens, <think> / </think> user-defined ones
    wr.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
                        else gguf.TokenType.NORMAL for _, i in vocab])
    wr.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    wr.add_eos_token_id(tok.eos_token_id)
    wr.add_pad_token_id(tok.pad_token_id)
    wr.add_chat_template(tok.chat_template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        wr.add_tensor(gg, np.ascontiguousarray(w[hf].astype(np.float32)))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path
