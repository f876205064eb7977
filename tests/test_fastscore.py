"""FastScorer against two independent references: a direct full-sequence float64 computation
and lm-eval's own HFLM on the same tiny model (float64, so differences are rounding only)."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from quantstudy.scoring import fastscore
from quantstudy.scoring.fastscore import FastScorer
from quantstudy.scoring.batchgen import generate_tokens
from quantstudy.scoring.protocol import GenRequest, LLRequest
from tests.tiny import bpe_llama

CORPUS = ["Question: What is the capital of France?\nAnswer: Paris is the capital.",
          "The quick brown fox jumps over the lazy dog. A dog sleeps in the sun.",
          "Rain falls on the plain in Spain; the sun sets in the west."] * 30
CTX = "Question: What is the capital of France?\nAnswer:"


@pytest.fixture(scope="module")
def tiny():
    """A byte-level BPE trained here (real merges, so token boundaries matter) and a random Llama."""
    return bpe_llama(CORPUS, 320, 48)


def requests() -> list[LLRequest]:
    conts = [" Paris", " Lyon is big", " a", " the quick brown fox jumps", " Paris"]  # a duplicate too
    reqs = [LLRequest(CTX, c) for c in conts]
    reqs += [LLRequest("The quick ", "brown fox"),  # trailing space moves to the continuation
             LLRequest("", "hello world"),  # empty context: conditioned on BOS
             LLRequest("Rain falls on the plain in Spain; the sun sets in the west. " * 3, "The dog"),  # > max_length
             LLRequest("A dog", " sleeps")]
    return reqs


def direct(model, ctx: list[int], cont: list[int], max_length: int) -> float:
    """Full-sequence log p(cont | ctx), computed one sequence at a time."""
    whole = (ctx + cont)[-(max_length + 1):]
    with torch.no_grad():
        lp = model(torch.tensor([whole[:-1]])).logits.log_softmax(-1)[0]
    n = len(whole) - 1
    return sum(lp[n - len(cont) + j, cont[j]].item() for j in range(len(cont)))


def hflm(model, tok, max_length: int | None = None) -> HFLM:
    return HFLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu", max_length=max_length)


def test_matches_full_sequence_and_lm_eval(tiny):
    model, tok = tiny
    fs = FastScorer(model, tok, batch_size=2)
    reqs = requests()
    got = fs.loglikelihood(reqs)
    assert fs.max_length == 48  # HFLM's rule: config.max_position_embeddings
    for r, g in zip(reqs, got):
        ctx, cont = fs.encode_pair(r.context, r.continuation)
        assert g.n_tokens == len(cont)
        assert g.logprob == pytest.approx(direct(model, ctx, cont, fs.max_length), abs=1e-9)
    ref = hflm(model, tok).loglikelihood(
        [Instance("loglikelihood", {}, (r.context, r.continuation), i) for i, r in enumerate(reqs)])
    assert [g.logprob for g in got] == pytest.approx([lp for lp, _ in ref], abs=1e-9)
    assert [g.is_greedy for g in got] == [gr for _, gr in ref]


@pytest.mark.parametrize("width", [4, 12, 256])  # rows of one unit, solo causal rows, all packed
def test_batching_and_packing_do_not_change_results(tiny, monkeypatch, width):
    model, tok = tiny
    reqs = requests()
    monkeypatch.setattr(fastscore, "PACK_WIDTH", width)
    one = FastScorer(model, tok, batch_size=1).loglikelihood(reqs)
    many = FastScorer(model, tok, batch_size=16, max_batch_tokens=40).loglikelihood(reqs)
    for r, a, b in zip(reqs, one, many):
        ctx, cont = FastScorer(model, tok).encode_pair(r.context, r.continuation)
        assert a.logprob == pytest.approx(direct(model, ctx, cont, 48), abs=1e-9)
        assert b.logprob == pytest.approx(a.logprob, abs=1e-10) and a.is_greedy == b.is_greedy


def test_eager_attention_float_mask_equals_sdpa_bool_mask(tiny, monkeypatch):
    # SDPA gets a boolean "may attend" mask, eager attention an additive float mask: same scores
    import copy

    model, tok = tiny
    monkeypatch.setattr(fastscore, "PACK_WIDTH", 256)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    a, b = FastScorer(model, tok), FastScorer(eager, tok)
    assert (a._bool_mask, b._bool_mask) == (True, False)
    for x, y in zip(a.loglikelihood(requests()), b.loglikelihood(requests())):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-7) and x.is_greedy == y.is_greedy  # kernel order


def test_is_greedy_against_lm_eval_tokens(tiny):
    model, tok = tiny
    ctx = tok.encode(CTX)
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ctx]), max_new_tokens=4, do_sample=False, pad_token_id=1)[0, len(ctx):]
    greedy = greedy.tolist()
    other = greedy[:-1] + [(greedy[-1] + 1) % len(tok)]  # same but the last token is not the argmax
    pairs = [(ctx, greedy), (ctx, other), (ctx, greedy[:1])]
    got = FastScorer(model, tok).score_tokens(pairs)
    assert [g for _, g in got] == [True, False, True]
    ref = hflm(model, tok)._loglikelihood_tokens([(None, c, k) for c, k in pairs])
    assert got == [(pytest.approx(lp, abs=1e-9), g) for lp, g in ref]


def test_rolling_matches_lm_eval_windows(tiny):
    model, tok = tiny
    texts = [" ".join(CORPUS[:3]), "The quick brown fox."]  # the first needs several 16-token windows
    got = FastScorer(model, tok, max_length=16).loglikelihood_rolling(texts)
    ref = hflm(model, tok, max_length=16).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    assert [g.logprob for g in got] == pytest.approx(ref, abs=1e-9)
    assert got[1].n_tokens == len(tok.encode(texts[1]))
    # a text within one window: plain sum of log p(token_t | BOS, tokens_<t)
    toks = tok.encode(texts[1])
    assert got[1].logprob == pytest.approx(direct(model, [0], toks, 16), abs=1e-9)


def test_generate_matches_hf_greedy_and_stops_per_sequence(tiny):
    model, tok = tiny
    prompts = [tok.encode(CTX), tok.encode("The"), tok.encode("Rain falls on the plain")]
    gens = generate_tokens(model, tok, prompts, 6, stops=[])
    for p, g in zip(prompts, gens):  # batched with left padding == one at a time through HF generate
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=1)[0, len(p):]
        assert g.tokens == ref.tolist()
        assert g.hit_max and 0 < g.ttft_s <= g.seconds
    # a stop string from the first sequence's 2nd token: each sequence stops at its own first
    # occurrence (computed from the unstopped run), the others run on unaffected
    stop = tok.decode(gens[0].tokens[1:2])

    def first_hit(toks: list[int]) -> int:
        return next((k for k in range(1, len(toks) + 1) if stop in tok.decode(toks[:k])), len(toks))

    rows: list[int] = []  # batch rows per forward pass: a stopped sequence must cost nothing more
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        cut = generate_tokens(model, tok, prompts, 6, stops=[stop])
    finally:
        hook.remove()
    assert rows[0] == 3 and sum(rows[1:]) == sum(len(c.tokens) - 1 for c in cut)
    assert len(cut[0].tokens) <= 2 and not cut[0].hit_max
    for g, c in zip(gens, cut):
        assert c.tokens == g.tokens[:first_hit(g.tokens)]
        assert c.hit_max == (stop not in tok.decode(g.tokens))
    # EOS stops a sequence too (the EOS token is counted, as it was generated)
    eos = gens[1].tokens[2]
    model.generation_config.eos_token_id = eos
    try:
        cut = generate_tokens(model, tok, prompts, 6, stops=[])
    finally:
        model.generation_config.eos_token_id = 1
    for g, c in zip(gens, cut):
        k = g.tokens.index(eos) + 1 if eos in g.tokens else len(g.tokens)
        assert c.tokens == g.tokens[:k]


def test_generate_matches_lm_eval_generate_until(tiny):
    model, tok = tiny
    reqs = [GenRequest(CTX, ("\n",), 8), GenRequest("The quick", (".", "dog"), 5), GenRequest("Rain", (), 7)]
    got = FastScorer(model, tok, batch_size=2).generate(reqs)
    ref = hflm(model, tok).generate_until(
        [Instance("generate_until", {}, (r.context, {"until": list(r.until), "max_gen_toks": r.max_new_tokens,
                                                     "do_sample": False}), i) for i, r in enumerate(reqs)])
    assert [g.text for g in got] == ref
    for g, r in zip(got, reqs):
        assert 1 <= g.n_tokens <= r.max_new_tokens and g.hit_max == (g.n_tokens == r.max_new_tokens) or not g.hit_max


def test_same_answers_as_the_lm_eval_scorer(tiny):
    from quantstudy.scoring.lmeval_backend import LMEvalScorer

    model, tok = tiny
    ours, ref = FastScorer(model, tok, batch_size=4), LMEvalScorer(model, tok, batch_size=4)
    reqs = requests()
    assert [(r.logprob, r.is_greedy, r.n_tokens) for r in ours.loglikelihood(reqs)] == [
        (pytest.approx(r.logprob, abs=1e-9), r.is_greedy, r.n_tokens) for r in ref.loglikelihood(reqs)]
    texts = [" ".join(CORPUS[:4]), "Rain falls."]
    assert [r.logprob for r in ours.loglikelihood_rolling(texts)] == pytest.approx(
        [r.logprob for r in ref.loglikelihood_rolling(texts)], abs=1e-9)
    gens = [GenRequest(CTX, ("\n",), 8), GenRequest("The quick", (" the",), 6)]
    assert [g.text for g in ours.generate(gens)] == [g.text for g in ref.generate(gens)]


def test_models_with_extra_logit_ops_use_full_logits(tiny):
    """Logit scaling after the head (Gemma-style soft-capping, Granite's scaling) must not be skipped."""
    model, tok = tiny
    hook = model.register_forward_hook(lambda m, i, o: setattr(o, "logits", 30 * torch.tanh(o.logits / 30)))
    try:
        fs = FastScorer(model, tok)
        assert not fs._split_head
        reqs = requests()
        for r, g in zip(reqs, fs.loglikelihood(reqs)):
            ctx, cont = fs.encode_pair(r.context, r.continuation)
            assert g.logprob == pytest.approx(direct(model, ctx, cont, fs.max_length), abs=1e-9)
    finally:
        hook.remove()
    assert FastScorer(model, tok)._split_head


def _direct_greedy(model, ctx: list[int], cont: list[int]) -> bool:
    whole = ctx + cont
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0]
    return bool((logits[len(ctx) - 1:].argmax(-1) == torch.tensor(cont)).all())


@pytest.mark.parametrize("width", [4, 12, 64])  # tiny rows force the tree to be cut and paths copied
def test_prefix_tree_shares_across_contexts_and_matches_full_sequences(tiny, monkeypatch, width):
    model, tok = tiny
    monkeypatch.setattr(fastscore, "PACK_WIDTH", width)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(2, len(tok), (n,), generator=g).tolist()  # noqa: E731
    stem = rand(24)
    pairs = []
    for k in range(12):  # contexts that share prefixes of different lengths, 3 continuations each
        ctx = stem[:3 + (k * 7) % 18] + rand(k % 4)
        pairs += [(ctx, rand(1 + (k + c) % 4)) for c in range(3)]
    pairs.append((stem[:5], stem[5:9]))  # its fed tokens are a prefix of other contexts
    pairs.append((stem[:8], [stem[8]]))  # fed sequence ends at a node inside the shared stem
    pairs.append((stem[:8], [stem[8]]))  # a duplicate request
    got = FastScorer(model, tok, batch_size=3, max_batch_tokens=64).score_tokens(pairs)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        assert lp == pytest.approx(direct(model, ctx, cont, 48), abs=1e-9)
        assert greedy == _direct_greedy(model, ctx, cont)


def test_prefix_tree_pieces_hold_whole_paths_and_share_prefixes():
    from quantstudy.scoring import prefixtree

    g = torch.Generator().manual_seed(1)
    stem = torch.randint(0, 50, (40,), generator=g).tolist()
    seqs = [stem[:5 + (k * 11) % 35] + torch.randint(0, 50, (1 + k % 6,), generator=g).tolist() for k in range(30)]
    trie = prefixtree.Trie()
    paths = [trie.add(s, i) for i, s in enumerate(seqs)]
    assert len(trie.tok) == len({tuple(s[:j]) for s in seqs for j in range(1, len(s) + 1)})  # distinct prefixes
    for limit in (8, 16, 64, 4096):
        pieces = prefixtree.split(trie, trie.sizes(), limit)
        owner = {i: p for p in pieces for i in p.reqs}
        assert sorted(owner) == list(range(len(seqs)))  # every request scored exactly once
        assert sum(len(p.reqs) for p in pieces) == len(seqs)
        for i, p in owner.items():
            assert set(paths[i]) <= set(p.nodes)  # its whole sequence is in its piece
        for p in pieces:
            assert len(set(p.nodes)) == len(p.nodes)
            assert all(trie.parent[n] in p.nodes[:j] or trie.parent[n] == -1 for j, n in enumerate(p.nodes))
        if limit == 4096:  # everything fits in one piece: each prefix once
            assert len(pieces) == 1 and len(pieces[0]) == len(trie.tok)
