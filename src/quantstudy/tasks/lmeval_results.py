"""An lm-eval task's results as quantstudy stores them: each document's responses filtered and scored
by the task's own `process_results` into one ItemRecord, and the task's own aggregation functions
over all selected items (tasks/lmeval_tasks.py runs the requests; see its docstring for what goes
where in a record).
"""

from __future__ import annotations

import json
import math
from typing import Any

from quantstudy import store as st
from quantstudy.tasks.base import sha


def is_binary(metric: str) -> bool:
    """A per-item right/wrong metric (lm-eval's acc, acc_norm, exact_match, IFEval's *_acc); others
    (f1, scores) are continuous. By name: a continuous metric can also take the values 0 and 1."""
    base = metric.split(",")[0]
    return base.startswith("acc") or base.endswith("_acc") or base in ("exact_match", "em", "exact")


def as_number(v: Any) -> float | None:
    """A plain number (a per-item metric value); None for pairs, strings, ... (corpus-level inputs)."""
    return float(v) if isinstance(v, (bool, int, float)) and not isinstance(v, complex) else None


def records(task: Any, key: str, docs: dict[int, Any], by: dict[int, list[Any]], hashes: dict[int, str],
            gen_info: dict[int, Any], scorer_name: str) -> list[st.ItemRecord]:
    """Filter the chunk's responses and score each document with the task's own process_results."""
    insts = [i for d in docs for i in by[d]]
    task._instances = insts  # apply_filters works on the task's instances: this chunk's only
    task.apply_filters()
    out = []
    for d, doc in docs.items():
        group = by[d]
        metrics, corpus = {}, {}
        for fk in group[0].filtered_resps:
            for m, v in task.process_results(doc, [i.filtered_resps[fk] for i in group]).items():
                name = m if fk == "none" else f"{m},{fk}"
                (metrics if as_number(v) is not None else corpus)[name] = v if as_number(v) is None else as_number(v)
        first = next(iter(group[0].filtered_resps))
        prim = next((n for n in metrics), None)
        rec = st.ItemRecord(task=key, item_id=str(d), item_hash=sha(json.dumps(doc, sort_keys=True, default=str)),
                            prompt_hash=hashes[d], gold=str(task.doc_to_target(doc)), prediction="", correct=None,
                            details={"metrics": metrics, "metric": prim, "backend": scorer_name,
                                     "task_name": task.task_name, "lmeval": True})
        if corpus:
            rec.details["corpus"] = json.loads(json.dumps(corpus, default=str))
        if prim is not None:
            if is_binary(prim):
                rec.correct = bool(metrics[prim])
            else:
                rec.score = metrics[prim]
        out_type = task.get_config("output_type")
        if out_type == "multiple_choice":
            lls = [i.resps[0][0] for i in group]
            rec.prediction = str(max(range(len(lls)), key=lambda k: (lls[k], -k)))
            rec.details["loglikelihoods"] = lls
        elif out_type == "generate_until":
            g = gen_info[id(group[0])]
            rec.prediction = str(group[0].filtered_resps[first])
            rec.n_tokens, rec.hit_max, rec.latency_s = g.n_tokens, g.hit_max, g.latency_s
            rec.details.update(response=g.text, max_new_tokens=int(dict(group[0].args[1]).get("max_gen_toks", 256)))
        elif out_type == "loglikelihood_rolling":
            r, text = gen_info[id(group[0])], group[0].args[0]
            ll = float(group[0].resps[0])
            # per-document NLL and word count: the report's word perplexity (weights = words), as WikiText's
            rec.score, rec.correct = -ll, None
            rec.details.update(logprob=ll, n_tokens=r.n_tokens,
                               n_words=_pair_weight(corpus.get("word_perplexity"), len(text.split())),
                               n_bytes=len(text.encode("utf-8")))
        out.append(rec)
    return out


def _pair_weight(pair: Any, default: int) -> int:
    """The weight of lm-eval's (loglikelihood, weight) pair for a weighted perplexity."""
    return int(pair[1]) if isinstance(pair, (list, tuple)) and len(pair) == 2 else default


def aggregate(task: Any, recs: list[st.ItemRecord], failed: dict[str, str] | None = None) -> dict[str, float]:
    """lm-eval's aggregation functions over all selected items (per-item values and corpus pairs).
    An aggregation that raises is left out and its error kept in `failed` (metric -> error) for the record."""
    agg, out = task.aggregation(), {}
    names = dict.fromkeys(n for r in recs for n in (*r.details["metrics"], *r.details.get("corpus", {})))
    for name in names:
        fn = agg.get(name.split(",")[0])
        vals = [r.details["metrics"].get(name, r.details.get("corpus", {}).get(name)) for r in recs]
        vals = [tuple(v) if isinstance(v, list) else v for v in vals if v is not None]
        if fn is None or not vals:
            continue
        try:
            v = fn(vals)
        except Exception as e:  # e.g. squadv2's metric, loaded from the hub, offline: not fatal, but on record
            if failed is not None:
                failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        if as_number(v) is not None and not math.isnan(float(v)):
            out[name] = float(v)
    out["n"] = float(len(recs))
    return out
