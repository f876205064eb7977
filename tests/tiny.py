"""Tiny random causal LMs with a real byte-level BPE tokenizer, built inside the tests (no network)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the cat sat on a mat while two dogs ran past seven red boxes and one blue house "
         "question answer what is how many numbers add sum total").split()
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def text(seed: int, n_words: int = 400) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_tiny_model(root: Path, hidden: int = 64, layers: int = 2, intermediate: int = 128, seed: int = 0) -> Path:
    """Save a random LlamaForCausalLM + tokenizer (with chat template) under root; return the dir."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text(s) for s in range(3)], vocab_size=320,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = CHAT
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root
