"""Token prefix tree for FastScorer: every shared prefix of the scored sequences is computed once.

The fed sequences of one scoring call (context + continuation[:-1] per request) are inserted
into a trie. A question's answer choices share its context, but different questions share
prefixes too (ARC's "Question:", HellaSwag items cut from the same video, MMLU's few-shot
examples per subject): on SmolLM2's tokens, ARC-Easy dev needs 23,283 tokens with per-context
sharing and 20,367 as a trie; HellaSwag (500 items) 40,695 vs 35,558. The trie is cut into
*pieces* of at most `limit` tokens (a subtree plus a copy of the path above it), which are
bin-packed into rows; FastScorer runs each row under a mask that lets a token see exactly its
ancestors, with position ids = depth, which reproduces the separate sequences' logits.
Hand-written because no library packs a prefix tree for one causal forward pass (vLLM's and
SGLang's radix caches share KV blocks between requests at serving time, not inside one batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PACK_MAX_TOKENS = 2048  # longest piece kept whole to avoid copying a long shared path


@dataclass
class Piece:
    nodes: list[int]  # trie node ids, every node after its parent (the path above comes first)
    reqs: list[int] = field(default_factory=list)  # requests scored in this piece

    def __len__(self) -> int:
        return len(self.nodes)


class Trie:
    def __init__(self) -> None:
        self.tok: list[int] = []
        self.parent: list[int] = []  # -1 at a root
        self.depth: list[int] = []  # position id (0 for a sequence's first token)
        self.kids: list[dict[int, int]] = [{}]  # token -> child; kids[0] is the virtual root's
        self.ends: list[list[int]] = [[]]  # requests whose sequence ends at the node (index + 1)

    def add(self, seq: list[int], req: int) -> list[int]:
        """Insert one fed sequence; returns its node ids (one per token)."""
        path, parent = [], -1
        for t in seq:
            n = self.kids[parent + 1].get(t)
            if n is None:
                n = len(self.tok)
                self.kids[parent + 1][t] = n
                self.tok.append(t)
                self.parent.append(parent)
                self.depth.append(len(path))
                self.kids.append({})
                self.ends.append([])
            path.append(n)
            parent = n
        self.ends[parent + 1].append(req)
        return path

    def sizes(self) -> list[int]:
        """Nodes in each node's subtree (a child always has a larger id than its parent)."""
        size = [1] * len(self.tok)
        for n in range(len(self.tok) - 1, -1, -1):
            if self.parent[n] >= 0:
                size[self.parent[n]] += size[n]
        return size

    def path(self, v: int) -> list[int]:
        out = []
        while v >= 0:
            out.append(v)
            v = self.parent[v]
        return out[::-1]

    def piece(self, v: int, group: list[int]) -> Piece:
        """The path down to v (v = -1: none) and the whole subtrees of the children in `group`."""
        p = Piece(self.path(v))
        stack = group[::-1]
        while stack:  # preorder: a node's parent is already in the piece
            n = stack.pop()
            p.nodes.append(n)
            p.reqs.extend(self.ends[n + 1])
            stack.extend(reversed(self.kids[n + 1].values()))
        return p


def split(trie: Trie, size: list[int], limit: int) -> list[Piece]:
    """Cut the trie into pieces of at most `limit` tokens where possible. Children of a node are
    grouped under one copy of their shared path; a subtree too big for a piece is split further
    down, unless its path is already over half the limit (then copying the path into each part
    would cost more than a wider row: it stays whole, up to PACK_MAX_TOKENS)."""
    out: list[Piece] = []
    stack = [-1]  # nodes whose children are still to be placed
    while stack:
        v = stack.pop()
        above = trie.depth[v] + 1 if v >= 0 else 0  # path tokens copied into each piece below v
        level: list[Piece] = []
        group: list[int] = []
        used = above
        for c in trie.kids[v + 1].values():
            s = size[c]
            if above + s <= limit:
                if group and used + s > limit:
                    level.append(trie.piece(v, group))
                    group, used = [], above
                group.append(c)
                used += s
            elif above + s <= PACK_MAX_TOKENS and 2 * (above + 1) > limit:
                level.append(trie.piece(v, [c]))
            else:
                stack.append(c)
        if group:
            level.append(trie.piece(v, group))
        if v >= 0 and trie.ends[v + 1]:  # requests ending exactly at v: scored with its first piece
            if not level:
                level.append(Piece(trie.path(v)))
            level[0].reqs.extend(trie.ends[v + 1])
        out.extend(level)
    return out


def pack(pieces: list[Piece], width: int) -> list[list[Piece]]:
    """First-fit decreasing: pieces share rows of `width` tokens (a longer piece gets its own row)."""
    rows: list[list[Piece]] = []
    free: list[int] = []
    for p in sorted(pieces, key=len, reverse=True):
        r = next((r for r, f in enumerate(free) if f >= len(p)), None)
        if r is None:
            rows.append([p])
            free.append(width - len(p))
        else:
            rows[r].append(p)
            free[r] -= len(p)
    return rows


def best_rows(trie: Trie, lin: float, att: float, max_width: int) -> list[list[Piece]]:
    """Pieces and rows at the piece limit with the least estimated work: a batch of rows padded
    to width w costs rows * w * (lin + att * w) (layers, plus attention over every query-key pair
    of the row, masked or not). Larger limits share more prefixes but widen the attention."""
    size = trie.sizes()
    best, best_cost = [], float("inf")
    for limit in [w for w in (64, 96, 128, 192, 256, 384, 512) if w <= max_width] or [max_width]:
        pieces = split(trie, size, limit)
        width = max(limit, max(map(len, pieces), default=1))
        rows = pack(pieces, width)
        w = max(sum(map(len, r)) for r in rows) if rows else 0
        cost = len(rows) * w * (lin + att * w)
        if cost < best_cost:
            best, best_cost = rows, cost
    return best
