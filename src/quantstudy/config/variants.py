"""Quantization variants: a study's (possibly list-valued) `quantize:` entries expanded into
concrete, uniquely named settings such as `gptq-w4g64-c32` (method, bits, group, symmetry,
calibration samples), or with a scheme `gptq-w8a8-smooth0.8-c512`, `rtn-fp8dyn`."""

from __future__ import annotations

import itertools
from typing import Any

from quantstudy.config import (AutoRoundOptions, AWQOptions, CalibrationConfig, GPTQOptions, Method, StudyConfig,
                               Strict)
from quantstudy.errors import QuantStudyError
from quantstudy.config.schemes import Scheme, info


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
    # fields below join the stage key only when set, so variants of older studies keep their keys
    scheme: Scheme | None = None  # None: int weights of `bits`, activations 16-bit (the original entries)
    smoothquant: float | None = None  # SmoothQuant strength in front of the method
    autoround: AutoRoundOptions = AutoRoundOptions()
    _added_later = frozenset({"scheme", "smoothquant", "autoround"})

    @property
    def quantizes_activations(self) -> bool:
        return self.scheme is not None and info(self.scheme).quantizes_activations

    def describe(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        if self.scheme is None:
            s = f"{self.method.value.upper()} W{self.bits} {g}{'' if self.symmetric else ' asym'}"
        else:
            si = info(self.scheme)
            w = f"{si.weight_type}{si.bits} weights {g}{'' if si.symmetric else ' asym'}"
            s = (f"{'SmoothQuant ' + format(self.smoothquant, 'g') + ' + ' if self.smoothquant is not None else ''}"
                 f"{_METHOD_LABEL.get(self.method.value, self.method.value.upper())} {self.scheme.value} ({w}, activations "
                 f"{si.activations or '16-bit (not quantized)'})")
        if self.calibration is not None:
            s += f", {self.calibration.samples} {self.calibration.source.value} samples"
        return s


_METHOD_LABEL = {"autoround": "AutoRound"}  # others print upper-case (GPTQ, AWQ, RTN)


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def variant_name(method: Method, bits: int, group: int | None, symmetric: bool, samples: int | None,
                 scheme: Scheme | None = None, smooth: float | None = None) -> str:
    g = "ch" if group is None else f"g{group}"
    if scheme is None:
        name = f"{method.value}-w{bits}{g}{'' if symmetric else '-asym'}"
    else:  # the group size shows only where the study chose it
        name = f"{method.value}-{info(scheme).label}{g if info(scheme).group_configurable else ''}"
    if smooth is not None:
        name += f"-smooth{smooth:g}"
    return name if samples is None else f"{name}-c{samples}"


def expand_variants(cfg: StudyConfig) -> list[Variant]:
    out: list[Variant] = []
    for i, e in enumerate(cfg.quantize):
        calib = e.calibration or cfg.calibration
        smooth = _as_list(e.smoothquant.strength) if e.smoothquant is not None else [None]
        combos = list(itertools.product(_as_list(e.method), _as_list(e.scheme), smooth, _as_list(e.bits),
                                        _as_list(e.group_size), _as_list(e.symmetric), _as_list(calib.samples)))
        if e.name and len(combos) > 1:
            raise QuantStudyError("an explicit `name` needs an entry that expands to one variant",
                                  field=f"quantize[{i}].name", value=e.name,
                                  fix="remove `name` or make method/bits/group_size/samples single values")
        seen: set[tuple] = set()  # a fixed-layout scheme crossed with a group_size list, RTN with samples
        for method, scheme, sq, bits, group, sym, n in combos:
            group = None if group == "channel" else group
            if scheme is not None:  # the preset fixes bits and symmetry, and the layout unless configurable
                si = info(scheme)
                bits, sym = si.bits, si.symmetric
                if not si.group_configurable:
                    group = si.group_size
            rtn = method == Method.rtn and sq is None  # RTN ignores calibration
            key = (method, scheme, sq, bits, group, sym, None if rtn else n)
            if key in seen:  # don't make duplicate variants
                continue
            seen.add(key)
            vcal = None if rtn else calib.model_copy(update={"samples": n})
            name = e.name or variant_name(method, bits, group, sym, None if vcal is None else n, scheme, sq)
            if (not e.name and vcal is not None and e.calibration is not None
                    and e.calibration.source != cfg.calibration.source):  # an explicit name is kept as written
                name += f"-{vcal.source.value}"
            out.append(Variant(name=name, method=method, bits=bits, group_size=group, symmetric=sym,
                               ignore=tuple(e.ignore), gptq=e.gptq, awq=e.awq, calibration=vcal, scheme=scheme,
                               smoothquant=sq,  # AutoRound's options only key AutoRound variants
                               autoround=e.autoround if method == Method.autoround else AutoRoundOptions()))
    names = [v.name for v in out]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise QuantStudyError("two quantize entries expand to the same variant", field="quantize", value=dups,
                              fix="remove the duplicate entry or give one of them an explicit `name:`")
    return out


# --------------------------------------------------------------------------- loading
