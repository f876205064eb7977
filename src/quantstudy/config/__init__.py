"""Study configuration: the schema (pydantic, extra="forbid"), loading with error translation, variants and schemes.

The public names are re-exported here, so `from quantstudy.config import StudyConfig, load_config` is the one
import a caller needs; variants and schemes are imported from their modules.
"""

from quantstudy.config.schema import (
    AWQOptions, AutoRoundOptions, CHAT_TEMPLATE_RESERVED, CalibSource, CalibrationConfig, DType, Device,
    GPTQOptions, LimitMode, LoraConfig, Method, ModelConfig, QuantizeEntry, SmoothQuantOptions, Strict,
    TaskName, TrainConfig, TrainMethod, TrainSource,
)
from quantstudy.config.evaluation import (
    DecisionConfig, EvalBackend, EvaluateConfig, FidelityConfig, LMEvalTaskSpec, MarginKind, SpeedBackend,
    SpeedConfig, TaskDecision, TaskSpec,
)
from quantstudy.config.cluster import ClusterConfig, StageResources
from quantstudy.config.load import StudyConfig, dump_config, load_config, parse_config, study_dir
