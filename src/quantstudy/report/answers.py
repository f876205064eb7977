"""Answer-level fidelity: which multiple-choice answers a variant changed against its parent.

For items evaluated on both models, the choice distribution softmax(per-choice loglikelihoods)
of the parent vs the variant: mean KL per task, and the share of items whose argmax choice (the
`acc` prediction) changed. A reading of stored evaluation items, so it lives with the report:
the fidelity stage (token level, on held-out text) does not depend on evaluation settings.
"""

from __future__ import annotations

import numpy as np

from quantstudy.store import Store


def answer_metrics(store: Store, variant: str, baseline: str) -> dict[str, tuple[float, int]]:
    """{"<task>.answer_kl" | "<task>.answer_change_share" | "answer_change_share": (value, n items)}."""
    from scipy.special import log_softmax

    base = {(r.task, r.item_id): r.details["loglikelihoods"] for _, r in store.items(model=baseline)
            if "loglikelihoods" in r.details}
    per_task: dict[str, list[tuple[float, bool]]] = {}
    for _, r in store.items(model=variant):
        lp_b = base.get((r.task, r.item_id))
        if lp_b is None or "loglikelihoods" not in r.details or len(lp_b) != len(r.details["loglikelihoods"]):
            continue
        lp = log_softmax(np.asarray(lp_b, dtype=np.float64))
        lq = log_softmax(np.asarray(r.details["loglikelihoods"], dtype=np.float64))
        kl = float(np.sum(np.exp(lp) * (lp - lq)))
        per_task.setdefault(r.task, []).append((kl, int(np.argmax(lp)) != int(np.argmax(lq))))
    out: dict[str, tuple[float, int]] = {}
    for task, rows in sorted(per_task.items()):
        out[f"{task}.answer_kl"] = (float(np.mean([k for k, _ in rows])), len(rows))
        out[f"{task}.answer_change_share"] = (float(np.mean([c for _, c in rows])), len(rows))
    if per_task:  # pooled over all items of all multiple-choice tasks
        flat = [c for rows in per_task.values() for _, c in rows]
        out["answer_change_share"] = (float(np.mean(flat)), len(flat))
    return out
