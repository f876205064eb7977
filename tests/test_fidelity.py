"""Fidelity metrics against independent float64 references (scipy, hand computation)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from scipy.special import rel_entr, softmax

from quantstudy.config import FidelityConfig, ModelConfig, StudyConfig, parse_config
from quantstudy.runtime.context import RunContext
from quantstudy.errors import QuantStudyError
from quantstudy.scoring.divergence import kl_topk_tail, topk_tail, windows
from quantstudy.store import ItemRecord, ModelRecord, Store
from quantstudy.stages.protocol import work_dir
from quantstudy.study import run_stage
from quantstudy.report.answers import answer_metrics

WORDS = ("the cat sat on a mat while seven quiet engineers measured how far the weights "
         "moved after rounding to four bits and nobody expected the answer to change").split()


def _text(seed: int = 0, n_words: int = 900) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A byte-level BPE tokenizer and two tiny Llama models: `base` and `noisy` (perturbed copy)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("fid")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_text(s) for s in range(3)], vocab_size=300, special_tokens=["<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than the 0.02-std init, so top-k and tails matter
        model.lm_head.weight.mul_(20)
    out = {"text": root / "text.txt"}
    out["text"].write_text(_text(7))
    for name, noise in (("base", 0.0), ("noisy", 0.05)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std() * torch.randn_like(p))
        out[name] = root / name
        model.save_pretrained(out[name])
        tok.save_pretrained(out[name])
    return out


def _ctx(tmp: Path, tiny: dict[str, Path], **fid: object) -> RunContext:
    fcfg = FidelityConfig(**{"source": str(tiny["text"]), "tokens": 300, "context_length": 64, **fid})
    cfg = StudyConfig(name="t", model=ModelConfig(source=str(tiny["base"])), fidelity=fcfg)
    return RunContext(cfg=cfg, study_dir=tmp, config_dir=tmp, store=Store(tmp / "store.sqlite"), data_dir=None, device="cpu",
                      console=Console(quiet=True))


def _rec(name: str, path: Path, role: str = "quantized") -> ModelRecord:
    return ModelRecord(name=name, role=role, path=str(path))


def _metrics(ctx: RunContext, model: str) -> dict[str, float]:
    return {n.removeprefix("fidelity."): v for _, n, v, _ in ctx.store.metrics(model) if n.startswith("fidelity.")}


def _reference(tiny: dict[str, Path], tokens: int, L: int, stride: int) -> dict[str, np.ndarray]:
    """float64, one forward per target token t on exactly its documented context ids[begin_t:t]
    (targets come in chunks of `stride`; a chunk's input window is the L tokens before its end)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny["base"])(tiny["text"].read_text())["input_ids"][:tokens]
    models = [AutoModelForCausalLM.from_pretrained(tiny[n], dtype=torch.float64).eval() for n in ("base", "noisy")]
    ctxs = []
    for t in range(1, len(ids)):
        stop = min(1 + ((t - 1) // stride + 1) * stride, len(ids))
        ctxs.append(ids[max(0, stop - 1 - L):t])
    # one batch, right-padded: causal attention means padding after a context cannot change it
    x = torch.tensor([c + [0] * (L - len(c)) for c in ctxs])
    last = torch.tensor([len(c) - 1 for c in ctxs])
    rows = {"gold": ids[1:]}
    with torch.no_grad():
        for key, m in zip(("logp", "logq"), models):
            rows[key] = torch.log_softmax(m(input_ids=x).logits[torch.arange(len(ctxs)), last], -1).numpy()
    return {k: np.array(v) for k, v in rows.items()}


# ------------------------------------------------------------------ pure arithmetic, known logits
def test_topk_tail_kl_matches_float64_on_known_logits() -> None:
    rng = np.random.default_rng(0)
    n, V = 50, 40
    a, b = rng.normal(0, 3, (n, V)), rng.normal(0, 3, (n, V))
    p, q = softmax(a, -1), softmax(b, -1)
    full = rel_entr(p, q).sum(-1)
    lp, lq = torch.log_softmax(torch.tensor(a), -1), torch.log_softmax(torch.tensor(b), -1)
    idx, vals, tail = topk_tail(lp, V)
    np.testing.assert_allclose(kl_topk_tail(idx, vals, tail, lq), full, rtol=1e-10, atol=1e-12)
    for k in (1, 5, 20):
        idx, vals, tail = topk_tail(lp, k)
        got = kl_topk_tail(idx, vals, tail, lq)
        order = np.argsort(-p, -1)[:, :k]  # hand-built k+1-outcome distributions
        pk, qk = np.take_along_axis(p, order, -1), np.take_along_axis(q, order, -1)
        pc = np.concatenate([pk, 1 - pk.sum(-1, keepdims=True)], -1)
        qc = np.concatenate([qk, 1 - qk.sum(-1, keepdims=True)], -1)
        np.testing.assert_allclose(got, rel_entr(pc, qc).sum(-1), rtol=1e-7, atol=1e-12)
        assert np.all(got <= full + 1e-12) and np.all(got >= -1e-12)
        assert got.mean() < full.mean()  # strictly below for random tails


@pytest.mark.parametrize("n,L,stride", [(300, 64, 64), (300, 64, 16), (65, 64, 64), (1000, 100, 37), (10, 64, 8)])
def test_windows_score_every_token_once(n: int, L: int, stride: int) -> None:
    scored = [t for _, first, stop in windows(n, L, stride) for t in range(first, stop)]
    assert scored == list(range(1, n))
    for begin, first, stop in windows(n, L, stride):
        assert (stop - 1) - begin <= L and first > begin  # input length, and every target has context
        assert begin == 0 or (stop - 1) - begin == L  # full-length windows once the text allows


def test_answer_metrics_match_hand_computation(tmp_path: Path, tiny: dict[str, Path]) -> None:
    ctx = _ctx(tmp_path, tiny)

    def item(task: str, iid: str, lls: list[float] | None) -> ItemRecord:
        return ItemRecord(task=task, item_id=iid, item_hash="h", prompt_hash="h", gold="0", prediction="0",
                          correct=True, details={} if lls is None else {"loglikelihoods": lls})

    ln = math.log
    ctx.store.put_items("base", [item("arc_easy", "1", [ln(.5), ln(.25), ln(.25)]), item("arc_easy", "2", [ln(.2), ln(.8)]),
                                 item("hellaswag", "9", [-1.0, -2.0, -3.0, -4.0]), item("gsm8k", "1", None)])
    ctx.store.put_items("var", [item("arc_easy", "1", [ln(.25) - 3, ln(.5) - 3, ln(.25) - 3]),
                                item("arc_easy", "2", [ln(.4), ln(.6)]), item("arc_easy", "3", [0.0, 1.0]),
                                item("hellaswag", "9", [-1.0, -2.0, -3.0, -4.0]), item("gsm8k", "1", None)])
    got = answer_metrics(ctx.store, "var", "base")
    kl1 = .5 * ln(2) + .25 * ln(.5)  # p=[.5,.25,.25], q=[.25,.5,.25]; answer changed 0 -> 1
    kl2 = .2 * ln(.2 / .4) + .8 * ln(.8 / .6)  # answer stays 1
    assert got["arc_easy.answer_kl"] == pytest.approx(((kl1 + kl2) / 2, 2), rel=1e-12)
    assert got["arc_easy.answer_change_share"] == (0.5, 2)
    assert got["hellaswag.answer_kl"] == (pytest.approx(0.0, abs=1e-15), 1)
    assert got["answer_change_share"] == (pytest.approx(1 / 3), 3)
    assert not any(k.startswith("gsm8k") for k in got)


# ------------------------------------------------------------------ end to end on tiny models
def test_model_against_itself_is_identical(tmp_path: Path, tiny: dict[str, Path]) -> None:
    ctx = _ctx(tmp_path, tiny, top_k=8)
    run_stage(ctx, "fidelity", _rec("same", tiny["base"]), parent=_rec("base", tiny["base"], "baseline"))
    m = _metrics(ctx, "same")
    assert m["kl_mean"] == pytest.approx(0, abs=1e-12) and m["kl_p99"] == pytest.approx(0, abs=1e-12)
    assert m["top1_agree"] == 1.0 and m["ppl_ratio"] == pytest.approx(1, abs=1e-12) and m["dp_rms"] < 1e-12
    assert m["n_tokens"] == 299


@pytest.mark.parametrize("stride", [64, 24])
def test_metrics_match_float64_reference(tmp_path: Path, tiny: dict[str, Path], stride: int) -> None:
    ref = _reference(tiny, 300, 64, stride)
    lp, lq, gold = ref["logp"], ref["logq"], ref["gold"]
    kl = rel_entr(np.exp(lp), np.exp(lq)).sum(-1)
    g = np.arange(len(gold))
    want = {"kl_mean": kl.mean(), "kl_median": np.median(kl), "kl_p99": np.percentile(kl, 99),
            "ppl": np.exp(-lq[g, gold].mean()), "ppl_baseline": np.exp(-lp[g, gold].mean()),
            "dp_rms": np.sqrt(np.mean((np.exp(lq[g, gold]) - np.exp(lp[g, gold])) ** 2))}
    vocab = lp.shape[1]
    ctx = _ctx(tmp_path, tiny, top_k=vocab, stride=stride)
    run_stage(ctx, "fidelity", _rec("noisy", tiny["noisy"]), parent=_rec("base", tiny["base"], "baseline"))
    m = _metrics(ctx, "noisy")
    assert want["kl_mean"] > 1e-3  # the perturbation is visible, so the comparison means something
    for name, v in want.items():
        assert m[name] == pytest.approx(v, rel=1e-4, abs=1e-7), name
    assert m["top1_agree"] == pytest.approx(np.mean(lp.argmax(-1) == lq.argmax(-1)), abs=1.5 / len(gold))
    assert m["n_tokens"] == len(gold) == 299
    ctx_k = _ctx(tmp_path / "k", tiny, top_k=4, stride=stride)
    run_stage(ctx_k, "fidelity", _rec("noisy", tiny["noisy"]), parent=_rec("base", tiny["base"], "baseline"))
    bound = _metrics(ctx_k, "noisy")["kl_mean"]
    assert 0 < bound <= want["kl_mean"] * (1 + 1e-5)


def test_baseline_is_cached_across_variants(tmp_path: Path, tiny: dict[str, Path]) -> None:
    import shutil

    base_dir = tmp_path / "base"  # a copy whose weights we delete after the first variant
    shutil.copytree(tiny["base"], base_dir)
    ctx = _ctx(tmp_path, tiny, top_k=16)
    baseline = _rec("base", base_dir, "baseline")
    run_stage(ctx, "fidelity", _rec("v1", tiny["noisy"]), parent=baseline)
    files = sorted((work_dir(ctx.study_dir) / "fidelity").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    mtime = files[0].stat().st_mtime_ns
    for w in base_dir.glob("*.safetensors"):
        w.unlink()  # the baseline model can no longer be loaded: a recompute would fail
    run_stage(ctx, "fidelity", _rec("v2", tiny["noisy"]), parent=baseline)
    assert sorted((work_dir(ctx.study_dir) / "fidelity").iterdir()) == files and files[0].stat().st_mtime_ns == mtime
    assert _metrics(ctx, "v2")["kl_mean"] == pytest.approx(_metrics(ctx, "v1")["kl_mean"], rel=1e-12)


def test_bad_settings_name_the_field(tmp_path: Path, tiny: dict[str, Path]) -> None:
    ctx = _ctx(tmp_path, tiny, source=str(tmp_path / "missing.txt"))
    with pytest.raises(QuantStudyError, match="fidelity.source"):
        run_stage(ctx, "fidelity", _rec("v", tiny["noisy"]), parent=_rec("base", tiny["base"], "baseline"))
    ctx = _ctx(tmp_path / "long", tiny, context_length=300)  # the tiny models have 256 positions
    with pytest.raises(QuantStudyError, match="fidelity.context_length.*300"):
        run_stage(ctx, "fidelity", _rec("v", tiny["noisy"]), parent=_rec("base", tiny["base"], "baseline"))
    with pytest.raises(QuantStudyError, match="stride"):
        parse_config({"name": "t", "model": {"source": "x/y"}, "fidelity": {"context_length": 64, "stride": 65}})


# ------------------------------------------------------------------ real model
@pytest.mark.slow
def test_smollm2_against_itself(tmp_path: Path, smollm2_dir: Path, shared_data: Path) -> None:
    fcfg = FidelityConfig(tokens=1024, context_length=512)
    cfg = StudyConfig(name="t", model=ModelConfig(source=str(smollm2_dir)), fidelity=fcfg)
    ctx = RunContext(cfg=cfg, study_dir=tmp_path, config_dir=tmp_path,
                     store=Store(tmp_path / "s.sqlite"), data_dir=shared_data,
                     device="cpu", console=Console(quiet=True))
    run_stage(ctx, "fidelity", _rec("self", smollm2_dir), parent=_rec("base", smollm2_dir, "baseline"))
    m = _metrics(ctx, "self")
    assert m["kl_mean"] == pytest.approx(0, abs=1e-9) and m["top1_agree"] == 1.0
    assert 5 < m["ppl_baseline"] < 100  # a 135M model on WikiText-2 (published: ~20-30 at 512 context)
