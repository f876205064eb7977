"""generate_continuous (prefix sharing + continuous batching) against transformers' own greedy
`generate`, one prompt at a time, on a tiny random Llama in float64 (differences are rounding only)."""

from __future__ import annotations

import pytest
import torch

from quantstudy.scoring import generation
from quantstudy.scoring.generation import generate_continuous, shared_prefixes
from tests.tiny import bpe_llama

CORPUS = ["Title: Normans\n\nBackground: The Normans were the people who gave their name to Normandy.",
          "Question: In what country is Normandy located?\n\nAnswer: France",
          "The quick brown fox jumps over the lazy dog. A dog sleeps in the sun."] * 30


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny(request):
    return bpe_llama(CORPUS, 300, 512, request.param)


def prompts(tok, n: int = 11) -> list[list[int]]:
    """Three passages with several questions each (shared prefixes of 40-70 tokens) and loners."""
    g = torch.Generator().manual_seed(1)
    rand = lambda k: torch.randint(2, len(tok), (k,), generator=g).tolist()  # noqa: E731
    passages = [rand(40), rand(55), rand(70)]
    out = [passages[k % 3] + rand(1 + (5 * k) % 9) for k in range(n)]
    return out + [rand(3), rand(25), rand(60)]


def reference(model, p: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, pad_token_id=1,
                              eos_token_id=1)[0, len(p):].tolist()


def test_shared_prefixes_groups_adjacent_requests_by_common_prefix():
    a, b = list(range(100)), list(range(100, 200))
    ps = [a + [7], b + [1], a + [8, 9], [5] * 40, a[:50] + [3], b + [2], a + [9]]
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    # a-questions share 100 tokens (a[:50]+[3] shares only 50 with them: less than half, its own
    # group of one); the b pair shares 100; [5]*40 shares nothing
    assert shared_prefixes(ps, order, 32) == [100, 100, 100, 0, 0, 100, 100]
    assert shared_prefixes(ps, order, 101) == [0] * 7
    # a prefix stops one token short of its shortest member
    assert shared_prefixes([a, a + [1]], [0, 1], 32) == [99, 99]


def test_same_tokens_as_hf_generate_with_refills_and_shifts(tiny, monkeypatch):
    from quantstudy.scoring.slotcache import SlotCache

    model, tok = tiny
    ps = prompts(tok)
    max_new = 40
    want = [reference(model, p, max_new) for p in ps]
    rows: list[int] = []
    shifts: list[int] = []
    shift = SlotCache.shift
    monkeypatch.setattr(SlotCache, "shift", lambda self, by, n: (shifts.append(by), shift(self, by, n))[1])
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        before = generation.STATS.decode_positions
        got = generate_continuous(model, tok, ps, max_new, [], batch_size=3)
    finally:
        hook.remove()
    assert [g.tokens for g in got] == want
    assert [g.hit_max for g in got] == [len(w) == max_new and 1 not in w for w in want]
    # each generated token after the first is one decode position: no row computed after its request ended
    assert generation.STATS.decode_positions - before == sum(len(w) - 1 for w in want)
    assert max(rows) <= 3 and all(g.cost_s > 0 for g in got)
    # 14 requests on 3 rows ran more steps than the buffer's free columns (40 + 32): rows moved left
    assert shifts and min(shifts) >= 32


def test_stop_strings_and_eos_stop_each_request_where_it_would_stop(tiny):
    model, tok = tiny
    ps = prompts(tok)
    full = [reference(model, p, 16) for p in ps]
    stop = tok.decode(full[0][2:3])  # appears in at least the first response

    def first_hit(toks: list[int]) -> int:
        return next((k for k in range(1, len(toks) + 1) if stop in tok.decode(toks[:k])), len(toks))

    got = generate_continuous(model, tok, ps, 16, [stop], batch_size=4)
    for f, g in zip(full, got):
        assert g.tokens == f[:first_hit(f)]
        assert g.hit_max == (stop not in tok.decode(f) and 1 not in f and len(f) == 16)
    assert not got[0].hit_max and len(got[0].tokens) <= 3
    eos = full[1][3]  # a token id as EOS: the request stops on it (counted), the others run on
    model.generation_config.eos_token_id = eos
    try:
        got = generate_continuous(model, tok, ps, 16, [], batch_size=4)
    finally:
        model.generation_config.eos_token_id = 1
    for f, g in zip(full, got):
        assert g.tokens == (f[:f.index(eos) + 1] if eos in f else f)


def test_shared_prefix_computed_once(tiny):
    """The passages' tokens go through the model once per passage, not once per question."""
    model, tok = tiny
    g = torch.Generator().manual_seed(2)
    rand = lambda k: torch.randint(2, len(tok), (k,), generator=g).tolist()  # noqa: E731
    passages = [rand(40), rand(55), rand(70)]
    ps = [passages[k % 3] + rand(5) for k in range(11)] + [rand(30), rand(30)]  # equal suffixes: no padding
    positions: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: positions.append(i[0].numel()))
    try:
        got = generate_continuous(model, tok, ps, 1, [], batch_size=16)
    finally:
        hook.remove()
    assert [g.tokens for g in got] == [reference(model, p, 1) for p in ps]
    # 4, 4 and 3 questions on the three passages: each passage computed once
    assert sum(positions) == sum(len(p) for p in ps) - 40 * 3 - 55 * 3 - 70 * 2


def test_slot_cache_size_and_prefill_passes_are_bounded(tiny, monkeypatch):
    """The memory bound of #21: the slot cache holds slots x (longest prompt + max_new + SLACK) columns,
    no more, and a prefill pass runs at most PREFILL_POSITIONS padded positions (one longer prompt alone)."""
    model, tok = tiny
    ps = prompts(tok)
    monkeypatch.setattr(generation, "PREFILL_POSITIONS", 64)
    passes: list[tuple[int, int]] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: passes.append(tuple(i[0].shape)))
    monkeypatch.setattr(generation, "STATS", generation.GenStats())
    try:
        got = generate_continuous(model, tok, ps, 8, [], batch_size=3)
    finally:
        hook.remove()
    assert [g.tokens for g in got] == [reference(model, p, 8) for p in ps]
    # by hand: 2 layers x (keys, values) x 3 slots x 2 kv heads x (70 + 8 + 32) columns x 8 dims x 8 bytes
    lmax = max(len(p) for p in ps)
    assert lmax == 70 + 8 and generation.SLACK == 32
    assert generation.STATS.cache_bytes == 2 * 2 * 3 * 2 * (lmax + 8 + 32) * 8 * 8
    prefill = [(r, w) for r, w in passes if w > 1]
    assert len(prefill) > 3 and all(r * w <= 64 or r == 1 for r, w in prefill)
    assert any(r > 1 for r, w in prefill)  # the bound still lets short suffixes share a pass


def test_grouped_query_sdpa_inside_generation_only(tiny, monkeypatch):
    """On the CPU an SDPA model attends through torch's grouped-query SDPA (no repeated keys) during
    generate_continuous, with the tokens of transformers' own SDPA (the tests above), and its
    attention implementation is restored afterwards."""
    model, tok = tiny
    calls: list[int] = []
    from quantstudy.scoring import attention

    real = attention._sdpa_gqa
    monkeypatch.setattr(attention, "_sdpa_gqa", lambda *a, **k: (calls.append(a[2].shape[1]), real(*a, **k))[1])
    before = model.config._attn_implementation
    generate_continuous(model, tok, prompts(tok)[:4], 4, [], batch_size=2)
    assert model.config._attn_implementation == before
    if before == "sdpa":
        assert calls and set(calls) == {2}  # keys arrive with the model's 2 kv heads, not repeated to 4
    else:
        assert not calls
