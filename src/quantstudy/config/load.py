"""The study file as a whole: `StudyConfig`, its cross-section rules, and loading with error translation.

`load_config(path)` parses YAML, validates it and turns every pydantic error into one `QuantStudyError`
line that names the field, the value and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from quantstudy.config.cluster import ClusterConfig
from quantstudy.errors import QuantStudyError
from quantstudy.config.schema import (
    CalibSource, CalibrationConfig, Device, Method, ModelConfig, QuantizeEntry, Strict, TrainConfig, safe_name,
)
from quantstudy.config.evaluation import DecisionConfig, EvaluateConfig, FidelityConfig, LMEvalTaskSpec, TaskSpec


class StudyConfig(Strict):
    name: str
    seed: int = 0
    output_dir: str = "runs/study"  # relative to the study file; must stay inside it
    data_dir: str | None = None  # offline raw data (the layout of ../shared/data)
    device: Device = Device.auto
    model: ModelConfig
    train: TrainConfig | None = None
    calibration: CalibrationConfig = CalibrationConfig()
    quantize: list[QuantizeEntry] = Field(default_factory=list)
    evaluate: EvaluateConfig | None = EvaluateConfig()
    fidelity: FidelityConfig | None = None
    decision: DecisionConfig = DecisionConfig()
    cluster: ClusterConfig | None = None  # Ray resources per stage (`run --ray-address`); no cache key uses it

    @model_validator(mode="after")
    def _train_calibration_needs_train(self) -> StudyConfig:
        # The one place of this rule (the train and quantize stages rely on it). An entry calibrates
        # unless it is plain RTN (config.variants.expand_variants: RTN without SmoothQuant ignores it).
        calibrated = [e.calibration or self.calibration for e in self.quantize if e.smoothquant is not None
                      or any(m != Method.rtn for m in (e.method if isinstance(e.method, list) else [e.method]))]
        if self.train is None and any(c.source == CalibSource.train for c in calibrated):
            raise ValueError("calibration source 'train' needs a `train:` section in the study "
                             "(add one, or choose sharegpt/openmathinstruct2/gsm8k/wikitext/jsonl)")
        return self

    @model_validator(mode="after")
    def _scheme_combinations(self) -> StudyConfig:
        from quantstudy.config.schemes import check_entry  # one rule table for load time, plan and docs

        from quantstudy.config.schemes import info

        for i, e in enumerate(self.quantize):
            schemes = e.scheme if isinstance(e.scheme, list) else [e.scheme]
            fields = set(e.model_fields_set)
            if len(schemes) > 1 and any(x is None or info(x).group_configurable for x in schemes):
                # a group size for the schemes that take one; fixed-layout schemes in the list ignore it
                fields.discard("group_size")
            for m in e.method if isinstance(e.method, list) else [e.method]:
                for s in schemes:
                    check_entry(i, m.value, s, fields, e.smoothquant is not None, e.group_size)
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not safe_name(v):
            raise ValueError("study name may use letters, digits, '.', '_' and '-' only")
        return v


def _loc(loc: tuple[Any, ...]) -> str:
    s = ""
    for p in loc:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk the config models along an error location, to suggest field names for typos."""
    model: Any = StudyConfig
    for p in loc[:-1]:
        if isinstance(p, int) or model is None:
            continue
        field = model.model_fields.get(p)
        if field is None:
            # union members (e.g. TaskName | TaskSpec) appear as their class names in loc
            return None
        ann = field.annotation
        model = None
        for cand in getattr(ann, "__args__", (ann,)):
            for c in getattr(cand, "__args__", (cand,)):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    model = c
    return model


def _explain(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper() or "[" in str(p)))
    where = _loc(loc) or "(top level)"
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        # a tagged union member (an evaluate.tasks entry) names its class right before the field
        tag = err["loc"][-2] if len(err["loc"]) > 1 else None
        model = {"TaskSpec": TaskSpec, "LMEvalTaskSpec": LMEvalTaskSpec}.get(str(tag)) or _model_at(loc)
        known = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        fix = f"did you mean `{close[0]}`?" if close else f"remove it; known fields here: {', '.join(known)}"
        return f"{where}: unknown field. Fix: {fix}"
    if kind == "missing":
        return f"{where}: required field is missing. Fix: add `{loc[-1]}:` to the study file"
    if kind == "enum":
        exp = err.get("ctx", {}).get("expected", "")
        close = difflib.get_close_matches(str(value), [x.strip(" '") for x in exp.replace(" or ", ",").split(",")], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{where}: {value!r} is not allowed{hint}. Fix: use one of {exp}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg} (got {value!r}). Fix: {_TYPE_FIX.get(kind, 'correct the value in the study file')}"


_MAPPING_FIX = "write it as a mapping: `key: value` lines indented under it (see the README's study file)"
# pydantic error type -> how to write the value instead (the error names the expected type already)
_TYPE_FIX = {"model_type": _MAPPING_FIX, "dict_type": _MAPPING_FIX,
             "list_type": "write it as a list: `[a, b]` or one `- item` line per entry",
             "int_type": "write a whole number", "int_parsing": "write a whole number",
             "float_type": "write a number", "float_parsing": "write a number",
             "string_type": "write text (quote it if YAML reads it as a number or a date)",
             "bool_type": "write true or false", "bool_parsing": "write true or false"}


def parse_config(data: Any, origin: str = "<config>") -> StudyConfig:
    if not isinstance(data, dict):
        raise QuantStudyError(f"{origin}: a study file must be a YAML mapping (`key: value` lines), "
                              f"not a {type(data).__name__}", value=data if not isinstance(data, list) else None,
                              fix=f"start {origin} with `name:` and `model:` keys")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as e:
        # pydantic reports one error per union branch; keep the first message per location
        lines: dict[str, str] = {}
        for err in e.errors():
            line = _explain(err)
            lines.setdefault(line.split(":", 1)[0], line)
        raise QuantStudyError(f"invalid study file {origin}:\n  " + "\n  ".join(lines.values())) from None


def load_config(path: str | Path) -> StudyConfig:
    p = Path(path)
    if not p.is_file():
        raise QuantStudyError("study file not found", value=str(p), fix="pass the path of a study YAML file")
    from quantstudy.config.yamlfile import read_yaml  # safe loading; refuses duplicate keys, non-UTF-8, empty files

    return parse_config(read_yaml(p), str(p))


def study_dir(cfg: StudyConfig, config_path: str | Path) -> Path:
    """The study directory, resolved against the study file's folder."""
    base = Path(config_path).resolve().parent
    out = Path(cfg.output_dir)
    return (out if out.is_absolute() else base / out).resolve()


def dump_config(cfg: StudyConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
