"""Prefix-sharing scorer: lm-eval's loglikelihood semantics, each shared prefix computed once.

lm-eval's HFLM runs every (context, continuation) pair as its own padded sequence, so a
4-choice question computes its context 4 times, and the vocabulary projection at every
position. Here the fed sequences of a call go into a token prefix tree (prefixtree.py): shared
contexts, and prefixes shared between questions, are computed once. The tree is cut into pieces
that are bin-packed into rows; under a 4D attention mask each token sees exactly its ancestors,
with position ids = depth, so one pass gives the logits of the separate sequences (no padding
to the longest question either). Packing beats expanding a KV cache over the continuations on
this CPU: one forward pass with larger matrices, no cache copies (SmolLM2, 150 ARC-Easy
questions: 11.7 s vs 28.8 s). The vocabulary projection runs only at positions that score a token,
once per position. On CPU the float32 Linear layers run on oneDNN (kernels.py).

Token splitting is lm-eval 0.4.13's (`TemplateLM._encode_pair`, the empty-context rule,
left truncation to max_length + 1); rolling windows come from lm_eval.utils itself.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lm_eval.models.utils import resolve_max_length
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from quantstudy.scoring import kernels, prefixtree
from quantstudy.data.chat import cut_at_stops, read_response
from quantstudy.scoring.generation import generate_continuous
from quantstudy.scoring.protocol import GenRequest, GenResult, LLRequest, LLResult, RollingResult

PACK_WIDTH = 512  # widest row for short pieces; a longer sequence whose context nothing shares runs alone
# logits per vocabulary projection call: 2**26 floats = 256 MB whatever the vocabulary (1365 positions
# at SmolLM2's 49k, 442 at Qwen3's 152k). Alone, the [positions, vocab] GEMM + log_softmax ran ~25%
# faster at 1024 rows than at 512 here; inside a whole HellaSwag-200 scoring pass 128-1365 rows
# took 25-33 s (run-to-run noise), so the budget bounds memory more than it buys speed.
HEAD_FLOATS = 1 << 26


@dataclass
class _Row:
    """Tokens of one row of a forward pass and what to score in it."""

    tokens: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)  # position ids
    parent: list[int] = field(default_factory=list)  # index in the row, -1 at a root
    scored: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (request, positions, targets)

    def __len__(self) -> int:
        return len(self.tokens)


class LMEvalTokens:
    """lm-eval 0.4.13 HFLM's tokenization: BOS rule, context/continuation split, empty context."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._prefix_str = tokenizer.decode(self.prefix_token_id)

    def tok_encode(self, s: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None and s.startswith(self._prefix_str):
            add_special_tokens = False  # the text already starts with BOS: don't add another
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tok.encode(s, **kw)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":  # condition on BOS/EOS (TemplateLM.loglikelihood)
            cont = self.tok_encode(continuation, add_special_tokens=False)
            return ([self.prefix_token_id], cont) if cont[0] != self.prefix_token_id else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())  # trailing spaces belong to the continuation
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
        return ctx, whole[len(ctx):]


class FastScorer(LMEvalTokens):
    name = "prefix-shared"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, device: str = "cpu",
                 max_length: int | None = None, max_batch_tokens: int | None = None):
        super().__init__(tokenizer)
        self.model, self.device = model.eval(), device
        self.batch_size = batch_size  # rows per forward pass (a row holds one or more contexts)
        # token budget per forward pass: bounds activation memory for long rows (perplexity windows)
        self.max_batch_tokens = max_batch_tokens or batch_size * 1024
        # HFLM.max_length: config n_positions/max_position_embeddings/n_ctx, tokenizer, else 2048
        self.max_length = max_length or resolve_max_length(model.config, tokenizer, default=2048)
        self._split_head = self._head_is_separable()
        self._bool_mask = getattr(model.config, "_attn_implementation", None) == "sdpa"
        # FLOPs per token of the layers (2 x weights) and per query-key pair of attention (4 x width x layers)
        cfg = model.config.get_text_config()
        self.vocab_size = model.get_output_embeddings().weight.shape[0] if self._split_head else cfg.vocab_size
        emb = sum(p.numel() for m in (model.get_input_embeddings(),) for p in m.parameters())
        self._cost = (2.0 * (sum(p.numel() for p in model.get_decoder().parameters()) - emb),
                      4.0 * cfg.hidden_size * cfg.num_hidden_layers)

    # ------------------------------------------------------------------ Scorer API
    def loglikelihood(self, requests: list[LLRequest]) -> list[LLResult]:
        pairs = [self.encode_pair(r.context, r.continuation) for r in requests]
        return [LLResult(lp, g, len(c)) for (lp, g), (_, c) in zip(self.score_tokens(pairs), pairs)]

    def loglikelihood_rolling(self, texts: list[str]) -> list[RollingResult]:
        windows, owner, n_tok = [], [], []
        for i, text in enumerate(texts):
            toks = self.tok_encode(text)
            n_tok.append(len(toks))
            for w in get_rolling_token_windows(toks, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        total = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, self.score_tokens(windows)):
            total[i] += lp
        return [RollingResult(t, n) for t, n in zip(total, n_tok)]

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        out: list[GenResult | None] = [None] * len(requests)
        eos = self.tok.decode(self.tok.eos_token_id) if self.tok.eos_token_id is not None else None
        groups: dict[tuple, list[int]] = defaultdict(list)  # same stop strings and budget per batch
        for i, r in enumerate(requests):
            groups[(r.until, r.max_new_tokens)].append(i)
        for (until, max_new), idx in groups.items():
            stops = list(until) + ([eos] if eos and eos not in until else [])
            # lm-eval: a context starting with BOS gets no second one; contexts are left-truncated.
            # All requests of a call go to one continuous batch (generation.py: shared prompt
            # prefixes computed once, finished rows refilled), not lm-eval's length-sorted batches.
            bos = self.tok.bos_token
            enc = [self.tok.encode(requests[i].context, **({"add_special_tokens": False} if bos and
                                   requests[i].context.startswith(bos) else {}))[-(self.max_length - max_new):]
                   for i in idx]
            with kernels.onednn_linear(self.model):
                gens = generate_continuous(self.model, self.tok, enc, max_new, stops, self.device,
                                           [requests[i].think for i in idx], self.batch_size)
            for i, g in zip(idx, gens):
                text = self.tok.decode(g.tokens, skip_special_tokens=True)
                think = requests[i].think
                # lm-eval: reasoning is stripped before stop strings
                sp, n_think = read_response(text, g.tokens, lambda t: self.tok.decode(t, skip_special_tokens=True),
                                            think)
                out[i] = GenResult(cut_at_stops(sp.answer, stops), len(g.tokens), g.hit_max, g.cost_s,
                                   sp.reasoning, n_think, sp.closed)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ core
    @torch.inference_mode()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context tokens, continuation tokens) -> (sum log p, all tokens greedy), lm-eval's way."""
        fed, ctx_len, shared = [], [], defaultdict(int)
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont or len(cont) > self.max_length:
                raise ValueError(f"request {i}: empty context/continuation or continuation over max_length")
            whole = (ctx + cont)[-(self.max_length + 1):]  # HFLM's left truncation
            fed.append(whole[:-1])  # the last continuation token is a target only
            ctx_len.append(len(whole) - len(cont))
            shared[tuple(whole[:ctx_len[-1]])] += 1
        # a long sequence whose context nothing shares (a perplexity window) runs alone under the
        # plain causal mask; the rest goes into the prefix tree, packed into rows under a 4D mask
        solo, trie, paths = [], prefixtree.Trie(), {}
        for i, seq in enumerate(fed):
            if len(seq) > PACK_WIDTH and shared[tuple(seq[:ctx_len[i]])] == 1:
                solo.append(_Row(seq, list(range(len(seq))), list(range(-1, len(seq) - 1)),
                                 [(i, list(range(ctx_len[i] - 1, len(seq))), pairs[i][1])]))
            else:
                paths[i] = trie.add(seq, i)
        packed = [self._row(trie, r, paths, ctx_len, pairs) for r in
                  prefixtree.best_rows(trie, *self._cost, max_width=PACK_WIDTH)] if paths else []
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        with kernels.onednn_linear(self.model):  # float32 CPU Linear on oneDNN: ~25% faster than MKL here
            for rows, masked in ((solo, False), (packed, True)):
                rows.sort(key=len, reverse=True)  # similar lengths share a batch
                start = 0
                while start < len(rows):
                    width, end = len(rows[start]), start + 1
                    while end < len(rows) and end - start < self.batch_size and (end - start + 1) * width <= self.max_batch_tokens:
                        end += 1
                    self._run_batch(rows[start:end], masked, results)
                    start = end
        return results  # type: ignore[return-value]

    @staticmethod
    def _row(trie: prefixtree.Trie, pieces: list[prefixtree.Piece], paths: dict[int, list[int]],
             ctx_len: list[int], pairs: list[tuple[list[int], list[int]]]) -> _Row:
        """Lay pieces side by side; each request is scored at its context's last token and at each
        fed continuation token (positions in the row), against the continuation's tokens."""
        row = _Row()
        for p in pieces:
            at = {n: len(row) + j for j, n in enumerate(p.nodes)}
            for n in p.nodes:
                row.tokens.append(trie.tok[n])
                row.depth.append(trie.depth[n])
                row.parent.append(at.get(trie.parent[n], -1))
            row.scored += [(i, [at[n] for n in paths[i][ctx_len[i] - 1:]], pairs[i][1]) for i in p.reqs]
        return row

    def _run_batch(self, rows: list[_Row], masked: bool, results: list) -> None:
        n, width = len(rows), len(rows[0])
        ids = torch.zeros(n, width, dtype=torch.long)
        pos = torch.zeros(n, width, dtype=torch.long)
        allowed = np.zeros((n, width, width), dtype=bool) if masked else None  # [row, query, key]
        # a position scored by several requests (a question's last context token, continuations that
        # start alike) gets its vocabulary projection once: HellaSwag 500, 27,988 -> 25,713 positions
        flat, at, uses, targets, spans = [], {}, [], [], []  # unique positions, use -> its index, target
        for b, row in enumerate(rows):
            ids[b, :len(row)], pos[b, :len(row)] = torch.tensor(row.tokens), torch.tensor(row.depth)
            if allowed is not None:  # a token sees its ancestors and itself (parents come first)
                for j, p in enumerate(row.parent):
                    if p >= 0:
                        allowed[b, j] = allowed[b, p]
                    allowed[b, j, j] = True
                allowed[b, range(len(row), width), range(len(row), width)] = True  # padding: itself, no NaN
            for i, positions, cont in row.scored:
                spans.append((i, len(uses), len(cont)))
                for q in positions:
                    uses.append(at.setdefault(b * width + q, len(at)))
                targets += cont
        flat = list(at)  # dict order = index order
        mask = None  # solo rows: right padding can't leak into a causal mask
        if allowed is not None:
            allowed_t = torch.from_numpy(allowed)
            if self._bool_mask:  # SDPA takes "may attend" booleans: same result, ~10% faster on CPU than
                mask = allowed_t[:, None]  # an additive float mask (HellaSwag, SmolLM2; bit-identical scores)
            else:  # eager attention adds the mask to the scores
                dtype = next(self.model.parameters()).dtype
                mask = torch.zeros(n, 1, width, width, dtype=dtype).masked_fill_(~allowed_t[:, None],
                                                                                 torch.finfo(dtype).min)
            mask = mask.to(self.device)
        lp, greedy = self._token_scores(ids.to(self.device), mask, pos.to(self.device) if masked else None,
                                        torch.tensor(flat, device=self.device), torch.tensor(uses, device=self.device),
                                        torch.tensor(targets, device=self.device))
        for i, s, m in spans:
            results[i] = (float(lp[s:s + m].sum()), bool(greedy[s:s + m].all()))

    def _token_scores(self, ids, mask, pos, flat, uses, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(targets[k]) and argmax == targets[k] at flattened position flat[uses[k]]; float64 on CPU."""
        if self._split_head:
            hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1])[flat]  # [positions, d_model]
            head = self.model.get_output_embeddings()
        else:  # model with logit scaling/soft-capping: take the full model's logits
            hidden = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            hidden, head = hidden.reshape(-1, hidden.shape[-1])[flat], (lambda x: x)
        lp = torch.empty(len(uses), dtype=torch.float64)
        greedy = torch.empty(len(uses), dtype=torch.bool)
        chunk = max(1, HEAD_FLOATS // self.vocab_size)
        for s in range(0, len(flat), chunk):
            logits = head(hidden[s:s + chunk])  # [chunk, vocab]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32 softmax
            k = ((uses >= s) & (uses < s + chunk)).nonzero()[:, 0]  # the uses of these positions
            u, t, out = uses[k] - s, targets[k], k.cpu()
            lp[out] = torch.log_softmax(logits, dim=-1)[u, t].double().cpu()
            greedy[out] = (logits.argmax(-1)[u] == t).cpu()
        return lp, greedy

    def _head_is_separable(self) -> bool:
        return head_is_separable(self.model, self.prefix_token_id, self.device)


@torch.inference_mode()
def head_is_separable(model: Any, token_id: int, device: str) -> bool:
    """True when logits == output_embeddings(decoder(x)), checked in one forward pass with hooks:
    then the head can run only where a token is scored. False for logit scaling / soft-capping."""
    try:
        dec, head = model.get_decoder(), model.get_output_embeddings()
    except AttributeError:
        return False
    if dec is None or head is None:
        return False
    seen: dict[str, torch.Tensor] = {}
    # (update() returns None: a hook that returns a value would replace the module's output)
    hooks = [dec.register_forward_hook(lambda m, i, o: seen.update(dec=o if torch.is_tensor(o) else o[0])),
             head.register_forward_hook(lambda m, i, o: seen.update(head_in=i[0], head_out=o))]
    try:
        logits = model(input_ids=torch.tensor([[token_id]], device=device)).logits
    finally:
        for h in hooks:
            h.remove()
    return ("head_out" in seen and seen["dec"].shape == seen["head_in"].shape
            and torch.equal(seen["dec"], seen["head_in"]) and torch.equal(seen["head_out"], logits))
