"""The `cluster:` section: what each stage asks of a Ray cluster, retries, and the shared model path.

Kept out of every cache key (no stage declares it): where a stage ran does not change its result,
and each result records the node, hardware and library versions it was computed with.
"""

from __future__ import annotations

from pydantic import Field

from quantstudy.config.schema import Strict


class StageResources(Strict):
    num_cpus: float = Field(1, gt=0)  # also the stage's torch threads
    num_gpus: float = Field(0, ge=0)
    memory: int | None = Field(None, gt=0)  # bytes Ray reserves for the task
    resources: dict[str, float] = Field(default_factory=dict)  # custom node resources, e.g. {"h100": 1}


class ClusterConfig(Strict):
    # a folder every node can read and write (NFS, a shared volume); models and caches live there.
    # None: the study directory, which is right only when every worker runs on this machine
    model_dir: str | None = None
    max_retries: int = Field(2, ge=0)  # re-runs of a task whose worker died (Ray's retry)
    # evaluation is cut into at least this many tasks per evaluation worker (bundles of items), so
    # no worker idles behind one long task; more means smaller bundles and more model loads
    tasks_per_worker: float = Field(2, gt=0)
    resolve: StageResources = StageResources()
    train: StageResources = StageResources()
    quantize: StageResources = StageResources()
    evaluate: StageResources = StageResources()
    # speed figures compare across models only from one kind of node: pin measure with a custom resource
    measure: StageResources = StageResources()
    fidelity: StageResources = StageResources()
