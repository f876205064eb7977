"""Quantization variants: a study's (possibly list-valued) `quantize:` entries expanded into
concrete, uniquely named settings such as `gptq-w4g64-c32` (method, bits, group, symmetry,
calibration samples)."""

from __future__ import annotations

import itertools
from typing import Any

from quantstudy.config import AWQOptions, CalibrationConfig, GPTQOptions, Method, StudyConfig, Strict
from quantstudy.errors import QuantStudyError


class Variant(Strict):
    """One concrete quantization setting, after list expansion."""

    name: str
    method: Method
    bits: int
    group_size: int | None  # None = per-channel
    symmetric: bool
    ignore: tuple[str, ...]
    gptq: GPTQOptions
    awq: AWQOptions
    calibration: CalibrationConfig | None  # None for RTN (no calibration data needed)

    @property
    def calib_samples(self) -> int | None:
        return None if self.calibration is None else int(self.calibration.samples)  # type: ignore[arg-type]

    def describe(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        s = f"{self.method.value.upper()} W{self.bits} {g}{'' if self.symmetric else ' asym'}"
        if self.calibration is not None:
            s += f", {self.calibration.samples} {self.calibration.source.value} samples"
        return s


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def variant_name(method: Method, bits: int, group: int | None, symmetric: bool, samples: int | None) -> str:
    g = "ch" if group is None else f"g{group}"
    name = f"{method.value}-w{bits}{g}{'' if symmetric else '-asym'}"
    return name if samples is None else f"{name}-c{samples}"


def expand_variants(cfg: StudyConfig) -> list[Variant]:
    out: list[Variant] = []
    for i, e in enumerate(cfg.quantize):
        calib = e.calibration or cfg.calibration
        combos = list(itertools.product(_as_list(e.method), _as_list(e.bits), _as_list(e.group_size),
                                        _as_list(e.symmetric), _as_list(calib.samples)))
        if e.name and len(combos) > 1:
            raise QuantStudyError("an explicit `name` needs an entry that expands to one variant",
                                  field=f"quantize[{i}].name", value=e.name,
                                  fix="remove `name` or make method/bits/group_size/samples single values")
        seen_rtn: set[tuple] = set()
        for method, bits, group, sym, n in combos:
            group = None if group == "channel" else group
            if method == Method.rtn:  # RTN ignores calibration; don't make duplicate variants
                key = (bits, group, sym)
                if key in seen_rtn:
                    continue
                seen_rtn.add(key)
                vcal = None
            else:
                vcal = calib.model_copy(update={"samples": n})
            name = e.name or variant_name(method, bits, group, sym, None if vcal is None else n)
            if (not e.name and vcal is not None and e.calibration is not None
                    and e.calibration.source != cfg.calibration.source):  # an explicit name is kept as written
                name += f"-{vcal.source.value}"
            out.append(Variant(name=name, method=method, bits=bits, group_size=group, symmetric=sym,
                               ignore=tuple(e.ignore), gptq=e.gptq, awq=e.awq, calibration=vcal))
    names = [v.name for v in out]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise QuantStudyError("two quantize entries expand to the same variant", field="quantize", value=dups,
                              fix="remove the duplicate entry or give one of them an explicit `name:`")
    return out


# --------------------------------------------------------------------------- loading
