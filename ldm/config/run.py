"""Config sections of where and how a run happens: tracking, compute, the time budget."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ldm.config.base import KNOB, Section


class TrackingConfig(Section):
    """MLflow: where runs are logged."""

    uri: str | None = Field(None, description="tracking URI; None = sqlite:///<workdir>/mlflow.db (local workdir)")
    experiment: str = "ldm-pipeline"


class ComputeConfig(Section):
    """Where the heavy stages run."""

    use_gpu: bool = False
    num_workers: int = Field(2, ge=1)
    ray_address: str | None = Field(None, description="existing Ray cluster; None = start a local one")
    job_cpus: float = Field(
        0.0,
        ge=0,
        description="CPUs each stage's Ray job driver asks for; > 0 keeps drivers off a head with 0 CPUs (prod); "
        "0 on a one-node cluster, where a driver holding a CPU would leave Ray Train's workers one short",
        json_schema_extra=KNOB,
    )
    job_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each stage's job driver asks for, to pin drivers to a node group "
        "(e.g. {cpu_pool: 0.01}); its stage's actors and tasks are not bound by it",
        json_schema_extra=KNOB,
    )
    forward_env: list[str] = Field(
        default_factory=list,
        description="names of environment variables sent to a remote Ray cluster (opt-in: none by default; "
        "a remote cluster should have its own credentials); a locally started cluster inherits the environment",
    )


BUDGETED_STAGES = ("train-vae", "train")  # the stages that size their own step counts to a time budget, in flow order


class StageBudget(Section):
    """One training stage's part of a time budget (ldm/budget.py)."""

    seconds: float = Field(
        gt=0, description="its training steps' seconds when it runs alone; in a flow, its weight in the time left"
    )
    after_s: float = Field(
        ge=0, description="seconds kept, when it starts, for the flow's work after its steps that no budget sizes"
    )


class BudgetConfig(Section):
    """How long a flow may take on this CPU, and how its training stages share the time (ldm/budget.py).

    Each stage in `stages` times a few of its own training steps where it runs (workers, threads,
    precision) and trains as many as its seconds allow, never more than its configured steps.
    """

    minutes: float = Field(
        gt=0, description="the whole flow, first line of `ldm run` to its last, install not included"
    )
    stages: dict[Literal["train-vae", "train"], StageBudget] = Field(min_length=1)
    min_scale: float = Field(
        0.25, gt=0, le=1, description="never fewer than this fraction of the configured steps (the run then overshoots)"
    )
    deadline: float | None = Field(
        None, description="set by the flow: the Unix time it should end by; None = each stage gets its `seconds`"
    )
