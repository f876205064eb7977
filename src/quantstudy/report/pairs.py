"""Which models a report compares: the models as the report sees them (`ModelInfo`), the pairs of
them that are tested (`plan_pairs`: each with its parent, then method / calibration / scheme /
training pairs that differ in that one thing), and the warning when a pair's models were made under
different library versions. analysis.py computes every pair's comparisons as one Holm family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from quantstudy.store import ModelRecord


class PairKind(str, Enum):
    parent = "vs parent"
    method = "method at equal calibration"
    calibration = "calibration size at equal method"
    training = "trained vs base at equal quantization"
    scheme = "scheme at equal method"  # e.g. W8A8 vs W4A16, both GPTQ at equal calibration (#22)


@dataclass
class Pair:
    kind: PairKind
    ref: str
    other: str
    title: str


@dataclass
class ModelInfo:
    name: str
    role: str
    parent: str | None
    describe: str
    path: str
    size_bytes: int | None
    spec: dict[str, Any]
    weights_hash: str | None
    mean_acc: float | None = None  # unweighted mean of the primary right/wrong metric over tasks
    acc_tasks: list[str] = field(default_factory=list)
    pareto: bool = False  # on the accuracy-vs-size Pareto front
    # how the Linear inputs were handled when this model was evaluated, read off the loaded modules (#22)
    eval_activations: dict[str, Any] | None = None


def describe(m: ModelRecord) -> str:
    if m.spec.get("describe"):
        return str(m.spec["describe"])
    return {"baseline": "original weights", "trained": "fine-tuned"}.get(m.role, m.role)


def _quant_key(m: ModelInfo, *drop: str) -> tuple | None:
    """The quantization settings of a model, without the fields in `drop` (None if not quantized)."""
    s = m.spec
    if m.role != "quantized" or "method" not in s:
        return None
    cal = s.get("calibration") or {}
    full = {"method": s.get("method"), "bits": s.get("bits"), "group_size": s.get("group_size"),
            "symmetric": s.get("symmetric"), "scheme": s.get("scheme") or f"W{s.get('bits')}A16",
            "smoothquant": s.get("smoothquant"), "ignore": tuple(s.get("ignore") or ()), "source": cal.get("source"),
            "samples": cal.get("samples"), "max_seq_len": cal.get("max_seq_len"), "seed": cal.get("seed")}
    return tuple(v for k, v in full.items() if k not in drop)


def _weights(m: ModelInfo) -> str:
    g = m.spec.get("group_size")
    w = f"W{m.spec.get('bits')} {'per-channel' if g is None else f'g{g}'}"
    return f"{m.spec['scheme']} ({w})" if m.spec.get("scheme") and m.spec.get("activations") else w


_SCHEME_FIELDS = ("scheme", "bits", "group_size", "symmetric", "smoothquant")  # what a scheme comparison lets differ


def _named_scheme(m: ModelInfo) -> bool:
    """Whether the study entry named a scheme. Entries that set only `bits` (all studies written before
    #22) store a derived W{bits}A16 too, and must pair as they did before #22: a W3 vs W4 comparison would
    join the Holm family and move every other p-value's adjustment. Specs written before `scheme_named`
    existed tell by their description, which names the scheme only when the entry did."""
    s = m.spec
    if "scheme_named" in s:
        return bool(s["scheme_named"])
    return bool(s.get("scheme")) and str(s["scheme"]) in str(s.get("describe") or "")


def _scheme(m: ModelInfo) -> str:
    return str(m.spec.get("scheme") or f"W{m.spec.get('bits')}A16")


def plan_pairs(models: list[ModelInfo]) -> list[Pair]:
    """Which models are compared: each with its parent, then the method / calibration / training pairs."""
    out = [Pair(PairKind.parent, m.parent, m.name, f"{m.name} vs its parent {m.parent}")
           for m in models if m.parent and any(p.name == m.parent for p in models)]
    roles = {m.name: m.role for m in models}
    quant = [m for m in models if _quant_key(m)]
    for i, a in enumerate(quant):
        for b in quant[i + 1:]:
            if a.parent != b.parent:
                same_tune = _quant_key(a, "source") == _quant_key(b, "source")
                if same_tune and {roles.get(a.parent), roles.get(b.parent)} == {"baseline", "trained"}:
                    base, tuned = (a, b) if roles.get(a.parent) == "baseline" else (b, a)
                    samples = (base.spec.get("calibration") or {}).get("samples")
                    out.append(Pair(PairKind.training, base.name, tuned.name,
                                    f"{tuned.name} vs {base.name}: trained vs base, both {base.spec['method'].upper()} "
                                    f"{_weights(base)}"
                                    + (f", {samples} calibration samples" if samples else "")))
            elif a.spec.get("calibration") and _quant_key(a, "method") == _quant_key(b, "method"):
                out.append(Pair(PairKind.method, a.name, b.name,
                                f"{a.spec['method'].upper()} vs {b.spec['method'].upper()}, {_weights(a)}, at equal "
                                f"calibration ({a.spec['calibration'].get('samples')} "
                                f"{a.spec['calibration'].get('source')} samples)"))
            elif (_quant_key(a, *_SCHEME_FIELDS) == _quant_key(b, *_SCHEME_FIELDS) and _scheme(a) != _scheme(b)
                  and (_named_scheme(a) or _named_scheme(b))):  # bits-only entries: no new pairs (see _named_scheme)
                cal = a.spec.get("calibration")
                out.append(Pair(PairKind.scheme, a.name, b.name,
                                f"{_scheme(b)} vs {_scheme(a)} at the same method ({a.spec['method'].upper()}"
                                + (f", {cal.get('samples')} {cal.get('source')} calibration samples)" if cal else ")")))
            elif a.spec.get("calibration") and _quant_key(a, "samples") == _quant_key(b, "samples"):
                lo, hi = sorted((a, b), key=lambda m: m.spec["calibration"].get("samples") or 0)
                out.append(Pair(PairKind.calibration, lo.name, hi.name,
                                f"{lo.spec['calibration'].get('samples')} vs {hi.spec['calibration'].get('samples')} "
                                f"calibration samples, {lo.spec['method'].upper()} {_weights(lo)}"))
    return out


# Libraries whose version can change a model's weights or its scores.
PRODUCING = ("torch", "transformers", "llmcompressor", "compressed-tensors", "trl", "peft")


def version_warnings(records: list[Any], pairs: list[Pair]) -> list[str]:
    """A comparison between models made under different library versions says so."""
    versions = {m.name: m.versions or {} for m in records}
    out = []
    for p in {(p.ref, p.other) for p in pairs}:
        a, b = versions.get(p[0], {}), versions.get(p[1], {})
        diff = [f"{lib} {a[lib]} vs {b[lib]}" for lib in PRODUCING if lib in a and lib in b and a[lib] != b[lib]]
        if diff:
            out.append(f"{p[0]} and {p[1]} were produced under different library versions ({'; '.join(diff)}); "
                       "part of their difference may come from the software, not the method")
    return sorted(out)
