"""The root configuration: the validated shape of the whole Hydra tree in `conf/`, and its
composition from that tree (`load_config`).

`OmniConfig.model_validate(dict)` is the one edge where configuration enters; every KFP component
receives the resolved tree (or its slice of it, `TaskConfig`) as JSON and re-validates it, so a task
never runs on a config the pipeline would have refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, get_origin

from pydantic import Field, ValidationError, create_model, model_validator

from components.stages import FILTERED_STAGE, STAGES
from model.config import (
    BenchmarkConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    SftFilterConfig,
    StageConfig,
    Strict,
)
from serving.config import ServingConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

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


class Taint(Strict):
    """A taint on a pool's nodes. The pool's pods get the matching toleration from it, so node pools
    (infra/), the chart and the compiled pipeline cannot disagree."""

    key: str
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"


class NodePoolSpec(Strict):
    """The machines `infra/` provisions for a pool (GKE node pool fields; kind gets one node each)."""

    machine_type: str
    gpu_model: str | None = Field(None, description="GKE accelerator type, e.g. nvidia-h100-80gb")
    gpus_per_node: int = Field(0, ge=0)
    min_nodes: int = Field(0, ge=0)
    max_nodes: int = Field(1, ge=1)
    disk_size_gb: int = Field(200, ge=10)
    nccl_env: dict[str, str] = Field(default_factory=dict,
                                     description="NCCL settings for this machine type, set on every TrainJob pod")

    @model_validator(mode="after")
    def _consistent(self) -> NodePoolSpec:
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) > max_nodes ({self.max_nodes})")
        if bool(self.gpu_model) != (self.gpus_per_node > 0):
            raise ValueError("set gpu_model and gpus_per_node together (both, or neither for a CPU pool)")
        return self


class PoolConfig(Strict):
    name: str = Field(pattern=r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$", description="node pool name in infra/")
    node_selector: dict[str, str] = Field(default_factory=dict, description="labels every node of the pool carries")
    taints: list[Taint] = Field(default_factory=list)
    accelerator_type: str | None = None
    accelerator_limit: int = Field(0, ge=0, description="GPUs per task pod (one KFP task = one pod)")
    cpu_request: str = "1"
    memory_request: str = "4Gi"
    shm_size: str | None = None
    node_pool: NodePoolSpec

    @property
    def tolerations(self) -> list[Toleration]:
        """Derived from `taints`: pods placed on this pool tolerate exactly its taints."""
        return [Toleration(key=t.key, operator="Exists", effect=t.effect) for t in self.taints]

    @model_validator(mode="after")
    def _fits_a_node(self) -> PoolConfig:
        if self.accelerator_limit and not self.accelerator_type:
            raise ValueError("accelerator_limit needs accelerator_type (e.g. nvidia.com/gpu)")
        if self.accelerator_limit > self.node_pool.gpus_per_node:
            raise ValueError(f"accelerator_limit ({self.accelerator_limit}) exceeds node_pool.gpus_per_node "
                             f"({self.node_pool.gpus_per_node}): no node of pool {self.name!r} could run the task")
        return self


class ImagesConfig(Strict):
    """The image tag scheme, in one place: `<registry>/<name>:<tag>` for every image we build."""

    registry: str
    tag: str
    cpu: str
    gpu: str
    serving: str

    def ref(self, which: Literal["cpu", "gpu", "serving"]) -> str:
        return f"{self.registry}/{getattr(self, which)}:{self.tag}"


class TrainerConfig(Strict):
    """Multi-node stages run as Kubeflow Trainer TrainJobs against the chart's TrainingRuntime."""

    runtime: str = Field("omni-torch-distributed", description="TrainingRuntime name (the chart installs it)")
    staging_uri: str = Field("s3://omni-platform/trainjobs",
                             description="object storage where a task hands data and checkpoints to TrainJob pods")
    storage_secret: str = Field("omni-storage", description="Secret with S3_ENDPOINT / AWS_* keys for those pods")
    mlflow_auth_secret: str = Field("omni-mlflow-auth", description="Secret with `username`/`password` for MLflow's "
                                    "basic auth, given to task and TrainJob pods as MLFLOW_TRACKING_*")
    poll_seconds: float = Field(10.0, gt=0)
    timeout_hours: float = Field(72.0, gt=0)
    checkpoint_claim: str = Field("omni-trainer-checkpoints", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                                  description="ReadWriteMany PVC every node pod mounts at /checkpoints: the "
                                              "DeepSpeed state outlives a pod, so a restart resumes")
    max_restarts: int = Field(3, ge=0, description="JobSet restarts of a failed TrainJob (each resumes)")


class KfpConfig(Strict):
    """Which Kubeflow Pipelines runs the tasks, and so which identity the chart's Role is bound to.

    standalone (infra/install.sh): tasks run in `namespace` as `pipeline-runner`; multi-user
    Kubeflow: in the profile namespace (cluster.namespace) as `default-editor`."""

    mode: Literal["standalone", "multi-user"] = "standalone"
    namespace: str = Field("kubeflow", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                           description="where standalone KFP is installed")

    def task_identity(self, profile_namespace: str) -> tuple[str, str]:
        """(namespace, service account) of the pipeline's task pods."""
        if self.mode == "standalone":
            return self.namespace, "pipeline-runner"
        return profile_namespace, "default-editor"


class EndpointConfig(Strict):
    """The champion InferenceService: what `promote` applies and the chart renders."""

    runtime: str = Field("omni-predictor", description="ServingRuntime name (the chart installs it)")
    service_account: str = "omni-serving"
    cpu: str = "4"
    memory: str = "32Gi"
    gpu: int = Field(1, ge=0)
    canary_percent: int = Field(10, ge=1, le=99, description="traffic share of a new champion before full rollout")
    canary_hold_s: float = Field(300.0, ge=0, description="how long the canary must stay Ready before full traffic")
    canary_max_error_rate: float = Field(0.02, ge=0, le=1, description="5xx share of the canary's requests in the hold")
    canary_max_p95_latency_s: float = Field(30.0, gt=0, description="95th percentile latency of the canary in the hold")
    canary_min_requests: int = Field(20, ge=1, description="fewer requests than this in the hold: too few to judge "
                                                           "rates (readiness and restarts still decide)")
    mlflow_artifacts_root: str | None = Field(
        "s3://omni-mlflow/artifacts",
        description="the MLflow server's --artifacts-destination: turns mlflow-artifacts:/ URIs into ones KServe "
                    "can fetch")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    container_concurrency: int = Field(
        8, ge=0, description="requests in flight per replica (Knative's hard limit; the autoscaler targets 70% of "
                             "it): what one batching predictor replica serves at once; 0 = unlimited")
    startup_timeout_s: float = Field(600.0, gt=0, description="until the predictor's port answers (startupProbe); "
                                                              "the model loads after that")
    progress_deadline_s: float = Field(
        2700.0, gt=0, description="Knative's limit for a new revision to become ready: node scale-up, image pull, "
                                  "model download and load together")
    ready_timeout_s: float = Field(3000.0, gt=0, description="how long promote/rollback wait for Ready")

    @model_validator(mode="after")
    def _replicas(self) -> EndpointConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.ready_timeout_s < self.progress_deadline_s:
            raise ValueError(f"ready_timeout_s ({self.ready_timeout_s:g}) < progress_deadline_s "
                             f"({self.progress_deadline_s:g}): promote would give up before Knative does")
        return self


class IngressConfig(Strict):
    """How the endpoint is reached from outside: Knative's domain (config-domain) and the URL scheme
    KServe writes into status.url. With Kourier, status.url is `<name>-predictor.<namespace>.<domain>`."""

    domain: str = Field("omni-platform.internal", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                        description="a DNS suffix you route to the Kourier load balancer (or send as Host)")
    scheme: Literal["http", "https"] = "http"


class ClusterConfig(Strict):
    target: Literal["local", "kubernetes"] = Field(
        "local", description="kubernetes: promote/rollback apply to the API server; local: write manifests only"
    )
    namespace: str = Field("kubeflow-user", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    images: ImagesConfig
    gpu_pool: PoolConfig
    cpu_pool: PoolConfig
    trainer: TrainerConfig = TrainerConfig()
    endpoint: EndpointConfig = EndpointConfig()
    kfp: KfpConfig = KfpConfig()
    pod_security: Literal["restricted", "baseline"] = Field(
        "restricted", description="Pod Security level enforced on cluster.namespace (restricted needs the "
                                  "storage-initializer settings infra/install.sh applies)")
    ingress: IngressConfig = IngressConfig()
    retries: int = Field(2, ge=0)
    caching: bool = True

    @model_validator(mode="after")
    def _distinct_pools(self) -> ClusterConfig:
        if self.gpu_pool.name == self.cpu_pool.name:
            raise ValueError(f"gpu_pool.name and cpu_pool.name are both {self.gpu_pool.name!r}")
        if self.gpu_pool.node_selector == self.cpu_pool.node_selector:
            raise ValueError("gpu_pool.node_selector equals cpu_pool.node_selector: CPU steps would land on GPUs")
        return self


class BenchmarkRule(Strict):
    """The gate's rule for one benchmark (its metric's direction comes from the metric)."""

    floor: float | None = Field(None, description="a minimum (a maximum for wer/cer) the candidate must meet")
    max_regression: float | None = Field(None, ge=0.0, description="absolute worsening allowed beyond the noise "
                                                                   "margin; null = promotion.max_regression")
    compare: bool = Field(True, description="compare with the champion (on the same data)")


class PromotionRules(Strict):
    """The `promotion` section of the config.

    benchmarks: per benchmark, a floor and the allowed regression (see BenchmarkRule); a benchmark
        with a rule must be on the candidate.
    compare_benchmarks: compare every benchmark both versions report, also those without a rule.
    noise_z: a regression is allowed up to max_regression + noise_z * sqrt(se_candidate^2 +
        se_champion^2), the standard errors being each version's (binomial for accuracies, bootstrap
        for WER/BLEU): a one-question drop on 36 questions is noise, not a regression. 0 = exact.
    Comparisons are like with like: a benchmark scored on different data (another data hash) is not
    compared.

    floors / higher_is_better / lower_is_better: the same on the cross-benchmark means
    (mcq_accuracy, wer, ...), without a noise margin; `max_regression` applies to them too.
    """

    benchmarks: dict[str, BenchmarkRule] = Field(default_factory=dict)
    compare_benchmarks: bool = True
    noise_z: float = Field(1.96, ge=0.0)
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


class _Root(Strict):
    """What the whole config and a task's slice of it share: where this machine keeps its files."""

    run: RunConfig = RunConfig()

    def workdir(self) -> Path:
        return Path(self.run.workdir).expanduser().resolve()


class OmniConfig(_Root):
    run: RunConfig = RunConfig()
    model: ModelConfig
    data: DataConfig = DataConfig()
    stages: dict[str, StageConfig]
    tracking: TrackingConfig = TrackingConfig()
    evaluation: EvalConfig = EvalConfig()
    benchmark: dict[str, BenchmarkConfig] = Field(
        default_factory=dict, description="the benchmarks evaluation runs (conf/benchmark/<name>.yaml, selected with "
                                          "benchmark=[name,...])")
    sft_filter: SftFilterConfig = SftFilterConfig()
    promotion: PromotionRules = PromotionRules()
    serving: ServingConfig = ServingConfig()
    cluster: ClusterConfig

    @model_validator(mode="after")
    def _endpoint_fills_a_batch(self) -> OmniConfig:
        """Knative's hard limit per replica must let the predictor fill its batch: under it, batch
        slots stay idle while requests wait in the queue-proxy."""
        limit, slots = self.cluster.endpoint.container_concurrency, self.serving.batching.max_batch_size
        if limit and limit < slots:
            raise ValueError(f"cluster.endpoint.container_concurrency={limit} is under serving.batching.max_batch_size="
                             f"{slots}: raise it (or 0 for no limit) so one replica can fill its batch")
        return self

    def ordered_stages(self) -> list[StageConfig]:
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; the DAG knows {', '.join(STAGES)}")
        return [self.stages[name] for name in STAGES if name in self.stages]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


class _Slice(_Root):
    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True)


def _optional_sections() -> dict:
    """OmniConfig's sections, each one optional: a map is empty and any other section None when the
    slice leaves it out (`run` keeps its defaults: every task has a work folder)."""
    out = {}
    for name, field in OmniConfig.model_fields.items():
        if name in _Root.model_fields:
            continue
        if get_origin(field.annotation) is dict:
            out[name] = (field.annotation, Field(default_factory=dict, description=field.description))
        else:
            out[name] = (field.annotation | None, Field(None, description=field.description))
    return out


# One task's slice of the resolved config (`components.slices`): the sections its step reads and
# nothing else, so a task's inputs, KFP's cache key, change only when what it depends on does. The
# sections are OmniConfig's (one schema); one outside the slice is None (or empty), so a step that
# reads one fails loudly.
TaskConfig = create_model("TaskConfig", __base__=_Slice, __module__=__name__, **_optional_sections())


def sft_filter_tasks(cfg: OmniConfig | TaskConfig) -> list[str] | None:
    """The record tasks the SFT loss filter scores: sft_filter.data_tasks, else those of the stage it
    runs before (stages.FILTERED_STAGE; None without either)."""
    if cfg.sft_filter.data_tasks is not None:
        return list(cfg.sft_filter.data_tasks)
    return list(cfg.stages[FILTERED_STAGE].data_tasks) if FILTERED_STAGE in cfg.stages else None


def merge_into(into: dict, part: dict) -> dict:
    """Deep-merge `part` into the nested dict `into` (dicts merge, anything else replaces)."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_into(into[key], value)
        else:
            into[key] = value
    return into


def parse_config(data: dict | str) -> OmniConfig:
    """Validate a config tree; errors name every bad field and what was expected."""
    return _validated(OmniConfig, data, "configuration")


def parse_task_config(data: dict | str) -> TaskConfig:
    """Validate a task's config slice, with the same messages as `parse_config`."""
    return _validated(TaskConfig, data, "task configuration")


def _validated(schema: type[Strict], data: dict | str, what: str):
    raw = json.loads(data) if isinstance(data, str) else data
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid {what}:\n" + "\n".join(lines)) from None


class ConfigError(ValueError):
    pass


def schema_override(override: str, conf_dir: Path = CONF_DIR) -> str:
    """`key=value` for any key the schema knows, written in the tree or not (defaults live in the
    pydantic models): Hydra's `++` sets it either way, and the schema then refuses unknown keys by
    name. Group choices (`model=omni-7b`) and explicit `+`/`~` overrides pass through unchanged."""
    key, sep, _ = override.partition("=")
    if not sep or key.startswith(("+", "~")) or (conf_dir / key.split("@")[0]).is_dir():
        return override
    return "++" + override


def load_config(overrides: list[str] | None = None, conf_dir: Path = CONF_DIR) -> OmniConfig:
    """The Hydra tree in `conf/` composed with `overrides` (Hydra's `key=value` / `group=option`
    strings, e.g. `stages.sft.steps=10`) and validated."""
    # Hydra is imported here: the pipeline's tasks parse their config JSON without composing a tree.
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=[schema_override(o, conf_dir) for o in overrides or []])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad override: {err}") from None
    return parse_config(OmegaConf.to_container(cfg, resolve=True))
