"""CUDA check of the packed path at a 4B shape: numerics of one layer, then decode speed and memory.

    python benchmarks/packed_gpu.py [--config qwen3-4b] [--new-tokens 64] [--rounds 3]

No downloads: a random-weight model with Qwen3-4B's configuration (written out below) is built on
the GPU in bf16; every decoder Linear gets random 4-bit values and group-128 scales (the weights
are q * scale exactly, so dense and packed hold the same numbers). It prints:
  1. one layer: packed `_weight_int4pack_mm` output vs the dense bf16 matmul of the same weights
     (checks the CUDA packing layout, which cannot run on a CPU build);
  2. decode tokens/s at batch 1 and 8 (greedy, random prompt ids, median of rounds), dense bf16
     vs packed, the bytes resident after building and the CUDA allocator peak while decoding
     (the models are measured one after the other, the first deleted and the allocator reset).
NOT RUN in the session that wrote it (no GPU was lent); its numbers are not in the README.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from quantstudy.scoring.packed import PackedBackend, pack_layer

QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)
GROUP = 128


def random_quant(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // GROUP, generator=g) * 0.004 + 0.001  # weights ~ N(0, 0.02)-sized
    return q, scale


def build(packed: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**QWEN3_4B), dtype=torch.bfloat16).cuda().eval()
    g = torch.Generator().manual_seed(seed)
    for name, mod in list(model.model.layers.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            q, scale = random_quant(mod.out_features, mod.in_features, g)
            if packed:
                parent, _, child = name.rpartition(".")
                setattr(model.model.layers.get_submodule(parent), child,
                        pack_layer(q, scale, None, None, PackedBackend.cuda, "cuda"))
            else:
                w = (q.float() * scale.repeat_interleave(GROUP, 1)).bfloat16()
                mod.weight.data.copy_(w)
    return model


def check_layer() -> None:
    g = torch.Generator().manual_seed(1)
    n, k = 9728, 2560
    q, scale = random_quant(n, k, g)
    layer = pack_layer(q, scale, None, None, PackedBackend.cuda, "cuda")
    w = (q.float() * scale.to(torch.bfloat16).float().repeat_interleave(GROUP, 1)).cuda()
    x = torch.randn(8, k, generator=g).cuda().bfloat16()
    y, ref = layer(x).float(), (x.float() @ w.t())
    rel = ((y - ref).norm() / ref.norm()).item()
    print(f"layer [{n}, {k}] g{GROUP}: packed vs dense relative error {rel:.2e} (bf16 rounding ~4e-3; a layout "
          f"error gives ~1)")
    assert rel < 2e-2, "CUDA packing layout is wrong"


def time_decode(model, batch: int, new_tokens: int, rounds: int) -> float:
    from quantstudy.scoring.batchgen import generate_tokens

    class Tok:  # generate_tokens needs only these
        eos_token_id, pad_token_id = -1, 0

        def decode(self, ids):
            return ""

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 150000, (128,), generator=g).tolist() for _ in range(batch)]
    model.generation_config.eos_token_id = None
    generate_tokens(model, Tok(), prompts, 4, [], "cuda")  # warm-up
    rates = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gens = generate_tokens(model, Tok(), prompts, new_tokens, [], "cuda")
        torch.cuda.synchronize()
        rates.append(sum(len(x.tokens) for x in gens) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU (sm80+)"
    print(torch.cuda.get_device_name(), torch.__version__)
    check_layer()
    rows = []
    for packed in (False, True):
        model = build(packed)  # built dense, then replaced: the build's own peak is not the model's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        res = {b: time_decode(model, b, a.new_tokens, a.rounds) for b in (1, 8)}
        rows.append(("packed int4 (tinygemm)" if packed else "dense bf16", res, resident,
                     torch.cuda.max_memory_allocated()))
        del model
        torch.cuda.empty_cache()
    print("| model | decode tok/s b1 | decode tok/s b8 | resident GiB | allocator peak GiB (decode) |\n"
          "|---|---|---|---|---|")
    for name, res, resident, peak in rows:
        print(f"| {name} | {res[1]:.1f} | {res[8]:.1f} | {resident / 2**30:.2f} | {peak / 2**30:.2f} |")


if __name__ == "__main__":
    main()
