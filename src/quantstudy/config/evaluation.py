"""Study configuration, the evaluation side: tasks (built-in and lm-eval), speed, fidelity and decision settings."""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from quantstudy.errors import QuantStudyError
from quantstudy.config.schema import LimitMode, Strict, TaskName


class TaskSpec(Strict):
    name: TaskName
    limit: int | None = Field(None, ge=1)
    num_fewshot: int | None = None
    chat_template: bool | None = None  # None = evaluate.chat_template
    # merged over model.chat_template_kwargs for this task's prompts (task keys win)
    chat_template_kwargs: dict[str, Any] | None = None
    # the name results are stored and reported under (default: the task's name); a task listed
    # twice with different settings (e.g. thinking on/off) needs a distinct alias on each extra entry
    alias: str | None = None
    _added_later = frozenset({"chat_template_kwargs", "alias"})

    @field_validator("alias")
    @classmethod
    def _safe_alias(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", v):
            raise ValueError("task alias may use lower-case letters, digits, '_', '.' and '-' only")
        return v

    @property
    def key(self) -> str:
        """Name of this evaluation setting in the store and the report."""
        return self.alias or self.name.value


class LMEvalTaskSpec(Strict):
    """A task or group from lm-evaluation-harness's registry, or from the user's own task YAML
    (`include_path`: a folder of YAML files or one file, relative to the study file). lm-eval builds
    it (tasks/lmeval_tasks.py); quantstudy's scorers answer its requests."""

    lmeval: str  # a task, group or tag name (`winogrande`, or the `task:` of a YAML under include_path)
    include_path: str | None = None
    limit: int | None = Field(None, ge=1)
    num_fewshot: int | None = None  # None = the task's own num_fewshot (lm-eval's default)
    chat_template: bool | None = None  # None = evaluate.chat_template
    chat_template_kwargs: dict[str, Any] | None = None
    max_new_tokens: int | None = Field(None, ge=1)  # generate_until: None = the task's max_gen_toks
    alias: str | None = None

    @field_validator("lmeval")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", v):
            raise ValueError("lmeval names a registered task/group (e.g. winogrande) or the `task:` name of a YAML "
                             "file under include_path; put the file's folder in include_path")
        return v

    _safe_alias = field_validator("alias")(TaskSpec._safe_alias.__func__)  # type: ignore[attr-defined]

    @property
    def key(self) -> str:
        return self.alias or self.lmeval


def _task_entry_kind(v: Any) -> str:
    """Which kind of `evaluate.tasks` entry a value is, so a bad entry gets only its own kind's errors."""
    if isinstance(v, dict):
        return "LMEvalTaskSpec" if "lmeval" in v else "TaskSpec"
    return type(v).__name__ if isinstance(v, (TaskSpec, LMEvalTaskSpec)) else "TaskName"


class SpeedBackend(str, Enum):
    packed = "packed"  # W4A16 variants on torch's int4 kernels (quantstudy.scoring.packed); other models dense
    dense = "dense"  # every model as transformers loads it (compressed-tensors decompressed to dense)


class SpeedConfig(Strict):
    prompts: int = Field(8, ge=1)  # fixed prompt set, first N ShareGPT prompts
    max_new_tokens: int = Field(64, ge=1)
    warmup: int = Field(1, ge=0)
    backend: SpeedBackend = SpeedBackend.packed
    batch: int = Field(8, ge=1)  # the larger batch decode is also measured at (prompts beyond N are not used)
    rounds: int = Field(3, ge=1)  # interleaved parent/model rounds behind the paired speed-up
    _added_later = frozenset({"backend", "batch", "rounds"})


class EvalBackend(str, Enum):
    fast = "fast"  # quantstudy.scoring.fastscore: prefix-sharing, same semantics as lm-eval
    lmeval = "lmeval"  # lm-eval's own HFLM (the reference; slower)


class EvaluateConfig(Strict):
    tasks: list[Annotated[Annotated[TaskName, Tag("TaskName")] | Annotated[TaskSpec, Tag("TaskSpec")]
                          | Annotated[LMEvalTaskSpec, Tag("LMEvalTaskSpec")], Discriminator(_task_entry_kind)]] = \
        Field(default_factory=lambda: [TaskName.arc_easy])
    backend: EvalBackend = EvalBackend.fast
    limit: int | None = Field(None, ge=1)  # per task; None = all items
    limit_mode: LimitMode = LimitMode.first
    num_fewshot: int | None = None  # None = lm-eval's default for each task
    batch_size: int = Field(16, ge=1)
    chat_template: bool = False
    max_new_tokens: int = Field(256, ge=1)
    seed: int = 1234
    speed: SpeedConfig | None = SpeedConfig()
    # lm-eval task YAML from an include_path may name Python functions (`!function`): running them
    # runs the user's code, so it is refused unless set (registry tasks are trusted like lm-eval itself)
    trust_task_code: bool = False
    _added_later = frozenset({"trust_task_code"})

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, v: list[Any]) -> list[Any]:
        if not v:  # an evaluate stage that evaluates nothing would still run (and load every model)
            raise ValueError("no tasks listed; list at least one (e.g. [arc_easy]), "
                             "or write `evaluate: null` to skip evaluation")
        return v

    def task_specs(self) -> list[TaskSpec]:
        """The built-in tasks, with the evaluate-level defaults filled in (lm-eval tasks: lmeval_specs)."""
        out = [t if isinstance(t, TaskSpec) else TaskSpec(name=t) for t in self.tasks
               if not isinstance(t, LMEvalTaskSpec)]
        seen = [t.key for t in out] + [t.key for t in self.tasks if isinstance(t, LMEvalTaskSpec)]
        dup = {n for n in seen if seen.count(n) > 1}
        if dup:
            raise QuantStudyError("a task is listed twice under the same name", field="evaluate.tasks",
                                  value=sorted(dup), fix="list each task once, or give the second entry its own "
                                  "`alias:` (e.g. gsm8k-think) to evaluate it under other settings")
        return [
            TaskSpec(name=t.name, limit=t.limit if t.limit is not None else self.limit,
                     num_fewshot=t.num_fewshot if t.num_fewshot is not None else self.num_fewshot,
                     chat_template=t.chat_template if t.chat_template is not None else self.chat_template,
                     chat_template_kwargs=t.chat_template_kwargs, alias=t.alias)
            for t in out
        ]

    def lmeval_specs(self) -> list[LMEvalTaskSpec]:
        """The lm-eval tasks, with the evaluate-level limit, num_fewshot and chat_template filled in."""
        return [t.model_copy(update={"limit": t.limit if t.limit is not None else self.limit,
                                     "num_fewshot": t.num_fewshot if t.num_fewshot is not None else self.num_fewshot,
                                     "chat_template": t.chat_template if t.chat_template is not None
                                     else self.chat_template})
                for t in self.tasks if isinstance(t, LMEvalTaskSpec)]


class FidelityConfig(Strict):
    source: str = "wikitext"  # `wikitext` or a path to a text file
    tokens: int = Field(16384, ge=128)
    context_length: int = Field(512, ge=16)
    stride: int | None = Field(None, ge=1)  # None = context_length (non-overlapping windows)
    top_k: int = Field(256, ge=1)  # 256: mean-KL bound ~10% low on SmolLM2, cache 33 MB per 16k tokens

    @model_validator(mode="after")
    def _stride(self) -> FidelityConfig:
        if self.stride is not None and self.stride > self.context_length:
            raise ValueError(f"fidelity.stride ({self.stride}) must be <= context_length ({self.context_length}), "
                             "or tokens between windows would never be scored")
        return self


class MarginKind(str, Enum):
    points = "points"  # accuracy points (1.0 = one percentage point of accuracy)
    relative = "relative"  # percent of the parent's score (1.0 = 1%); perplexity is always relative


# what a `deciding` entry may name: a task (its right/wrong metric) or task.metric
_DECIDING = re.compile(r"(?P<task>[a-z0-9_]+)(\.(?P<metric>acc|em|f1|word_perplexity))?")


class TaskDecision(Strict):
    margin: float | None = Field(None, gt=0, lt=100)  # None = decision.margin
    margin_kind: MarginKind | None = None  # None = decision.margin_kind


class DecisionConfig(Strict):
    """Deployment decisions by non-inferiority (report/decide.py): a variant is recommended only when the
    one-sided (1 - alpha) bound of its loss vs its parent is inside the margin on every deciding metric."""

    margin: float = Field(1.0, gt=0, lt=100)
    margin_kind: MarginKind = MarginKind.points
    alpha: float = Field(0.05, gt=0, lt=0.5)  # for the whole recommendation (split over candidate variants)
    power: float = Field(0.8, gt=0.5, lt=1)  # for the sample-size planning
    deciding: list[str] | None = None  # "arc_easy" or "squad_v2.f1"; None = every right/wrong metric
    tasks: dict[TaskName, TaskDecision] = Field(default_factory=dict)  # per-task margin overrides

    @field_validator("deciding")
    @classmethod
    def _deciding(cls, v: list[str] | None) -> list[str] | None:
        for entry in v or []:
            m = _DECIDING.fullmatch(entry)
            if not m or m["task"] not in {t.value for t in TaskName}:
                raise ValueError(f"decision.deciding entry {entry!r} is not a task or task.metric: use one of "
                                 f"{', '.join(t.value for t in TaskName)}, optionally with .acc, .em, .f1 or "
                                 ".word_perplexity (e.g. squad_v2.f1)")
        return v
