"""The root configuration: the validated shape of the whole Hydra tree in `conf/`.

`OmniConfig.model_validate(dict)` is the one edge where configuration enters; every KFP component
receives the resolved tree as JSON and re-validates it, so a task never runs on a config the
pipeline would have refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.config import DataConfig, EvalConfig, ModelConfig, StageConfig
from serving.config import ServingConfig

STAGE_ORDER = ("image_1", "image_2", "image_3", "video", "audio", "omni_align", "sft")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunConfig(Strict):
    name: str = "omni-demo"
    workdir: str = Field(".omni", description="local artifact root (MLflow db, pipeline root, exports)")
    skip_stages: list[str] = Field(default_factory=list)


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; null = sqlite file in run.workdir")
    experiment: str = "omni-platform"
    registered_model: str = "omni-tiny"


class Toleration(Strict):
    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class PoolConfig(Strict):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    accelerator_type: str | None = None
    accelerator_limit: int = 0
    cpu_request: str = "1"
    memory_request: str = "4Gi"
    shm_size: str | None = None


class ImagesConfig(Strict):
    registry: str
    tag: str
    cpu: str
    gpu: str
    serving: str

    def ref(self, which: Literal["cpu", "gpu", "serving"]) -> str:
        return f"{self.registry}/{getattr(self, which)}:{self.tag}"


class ClusterConfig(Strict):
    namespace: str = "kubeflow-user"
    images: ImagesConfig
    gpu_pool: PoolConfig
    cpu_pool: PoolConfig
    retries: int = Field(2, ge=0)
    caching: bool = True


class PromotionRules(BaseModel):
    """The `promotion` section of the config.

    floors: metric -> the bound the candidate must meet. For a metric listed in
        `lower_is_better` (e.g. wer) the bound is a maximum, otherwise a minimum.
    higher_is_better / lower_is_better: the metrics compared against the champion.
    max_regression: how much worse (absolute) than the champion each compared metric may be.
    """

    model_config = ConfigDict(extra="forbid")

    floors: dict[str, float] = Field(default_factory=dict)
    higher_is_better: list[str] = Field(default_factory=list)
    lower_is_better: list[str] = Field(default_factory=list)
    max_regression: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _one_direction_each(self) -> PromotionRules:
        both = sorted(set(self.higher_is_better) & set(self.lower_is_better))
        if both:
            raise ValueError(f"metrics listed as both higher and lower is better: {both}")
        return self


class OmniConfig(Strict):
    run: RunConfig = RunConfig()
    model: ModelConfig
    data: DataConfig = DataConfig()
    stages: dict[str, StageConfig]
    tracking: TrackingConfig = TrackingConfig()
    evaluation: EvalConfig = EvalConfig()
    promotion: PromotionRules = PromotionRules()
    serving: ServingConfig = ServingConfig()
    cluster: ClusterConfig

    def ordered_stages(self) -> list[StageConfig]:
        unknown = set(self.stages) - set(STAGE_ORDER)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; the DAG knows {', '.join(STAGE_ORDER)}")
        return [self.stages[name] for name in STAGE_ORDER if name in self.stages]

    def workdir(self) -> Path:
        return Path(self.run.workdir).expanduser().resolve()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def parse_config(data: dict | str) -> OmniConfig:
    """Validate a config tree; errors name every bad field and what was expected."""
    raw = json.loads(data) if isinstance(data, str) else data
    try:
        return OmniConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


class ConfigError(ValueError):
    pass
