"""The omni training DAG (SPEC §8):

    resolve-config -> data-prep -> init-model -> image-1 -> image-2 -> image-3 -> video -> audio -> omni-align
      -> sft-loss-filter -> sft -> (evaluate-initial) evaluate -> export-triton -> register -> gate
      -> dsl.If(promote) / Else(keep champion)

GPU stages carry the accelerator, node selector, toleration and a memory-backed /dev/shm from the
cluster config; CPU steps go to the CPU pool. Both are no-ops under `kfp.local`.
"""

from copy import deepcopy
from typing import NamedTuple

from kfp import dsl, kubernetes

from components.cluster.trainjob import needs_trainjob
from components.config import OmniConfig, PoolConfig
from components.pipeline_components import make_components
from components.stages import FILTERED_STAGE, STAGES, task_name

PIPELINE_NAME = "omni-platform"
# Deterministic steps are cached; steps with side effects in MLflow (or the cluster) are not, and
# no cached step takes an input from them (tests/pipelines/test_cache_keys.py).
UNCACHED = {"start-tracking", "register", "gate", "promote", "keep-champion"}


def _place(task: dsl.PipelineTask, pool: PoolConfig, retries: int) -> dsl.PipelineTask:
    for key, value in pool.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in pool.tolerations:
        kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect)
    task.set_cpu_request(pool.cpu_request).set_memory_request(pool.memory_request)
    if pool.accelerator_type and pool.accelerator_limit:
        task.set_accelerator_type(pool.accelerator_type).set_accelerator_limit(pool.accelerator_limit)
    if pool.shm_size:
        # NCCL and DataLoader workers exchange tensors through /dev/shm; the default 64 MiB is too small.
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=pool.shm_size
        )
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0)
    return task


def _storage_env(task: dsl.PipelineTask, secret: str) -> dsl.PipelineTask:
    """S3 endpoint and keys from the cluster's storage Secret (model/storage.StorageConfig.from_env
    reads them): object-store data, and TrainJob staging. Optional, so a cluster that keeps
    everything on the KFP artifact store runs without the Secret."""
    keys = ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    return kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in keys}, optional=True)


def _mlflow_auth_env(task: dsl.PipelineTask, secret: str) -> dsl.PipelineTask:
    """MLflow's basic-auth credentials (the chart's mlflow.auth), read by the MLflow client from
    MLFLOW_TRACKING_USERNAME/PASSWORD. Optional: a server without auth needs none."""
    keys = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}
    return kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys, optional=True)


def _named(component, name: str):
    """`component` under the task name `name`: KFP names a task after its component, so a stage's
    task (in the UI and in kfp.local's log) is `sft`, not `train-stage-7`. Same executor and code."""
    if component.name == name:
        return component
    copy = deepcopy(component)
    copy.component_spec.name = copy.name = name
    return copy


class PipelineOutputs(NamedTuple):
    version: str
    verdict: str
    evaluation: str


def _stepper(cfg: OmniConfig):
    """`step(component, name, **inputs)`: a task named `name`, cached unless it talks to MLflow, with
    the Secrets' env, on its component's pool."""
    cluster = cfg.cluster
    pools = {"cpu": cluster.cpu_pool, "gpu": cluster.gpu_pool}

    def step(component, name: str, **inputs) -> dsl.PipelineTask:
        task = _named(component, name)(**inputs).set_display_name(name)
        task.set_caching_options(cluster.caching and name not in UNCACHED)
        _storage_env(task, cluster.trainer.storage_secret)
        _mlflow_auth_env(task, cluster.trainer.mlflow_auth_secret)
        return _place(task, pools[component.pool], 0 if name in UNCACHED else cluster.retries)

    return step


def build_pipeline(cfg: OmniConfig):
    """The pipeline function for this config. Its parameters are what a person changes per run (typed
    and described in the UI's run form); the compiled config is the default of `config_json`."""
    cluster = cfg.cluster
    ops = make_components({"cpu": cluster.images.ref("cpu"), "gpu": cluster.images.ref("gpu")})
    step = _stepper(cfg)

    @dsl.pipeline(name=PIPELINE_NAME, description="Omni-modal LLM: data prep, staged training, evaluation, "
                  "Triton export, MLflow registry, gated promotion to KServe")
    def omni_pipeline(data_uri: str, overrides: list = [], llm: str = cfg.model.init.llm or "",  # noqa: B006
                      vision: str = cfg.model.init.vision or "", audio: str = cfg.model.init.audio or "",
                      registered_model: str = cfg.tracking.registered_model,
                      experiment: str = cfg.tracking.experiment,
                      config_json: str = cfg.to_json()) -> PipelineOutputs:
        """Train, evaluate, register and (if the gate passes) promote the omni model.

        Args:
            data_uri: The training records: JSONL files or folders of them, comma-separated, local
                paths or s3:// URIs.
            overrides: Config changes for this run, Hydra style: a list of "key=value" strings, e.g.
                ["stages.sft.lr=1e-5", "stages.sft.steps=2000"]. Checked against the config schema in
                the first task: a bad key fails the run there, naming the key.
            llm: The pretrained LLM to start from (model.init.llm): a Hugging Face Qwen2-class folder
                or s3:// URI; empty = as compiled (fresh weights for the tiny model).
            vision: The pretrained SigLIP vision tower (model.init.vision): folder or s3:// URI;
                empty = as compiled.
            audio: The pretrained Whisper model (model.init.audio): folder or s3:// URI; empty = as
                compiled.
            registered_model: The MLflow registered model the trained version is added to
                (tracking.registered_model).
            experiment: The MLflow experiment of this run (tracking.experiment).
            config_json: The whole resolved config this pipeline was compiled with; change a run with
                overrides instead.
        """
        run_id = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
        cfgs = step(ops.resolve_config, "resolve-config", config_json=config_json, overrides=overrides, llm=llm,
                    vision=vision, audio=audio, registered_model=registered_model, experiment=experiment).outputs
        parent = step(ops.start_tracking, "start-tracking", config_json=cfgs["config"], pipeline_run=run_id)
        prep = step(ops.data_prep, "data-prep", config_json=cfgs["prep"], data_uri=data_uri)
        dataset = prep.outputs["dataset"]
        init = step(ops.init_model, "init-model", config_json=cfgs["init"], dataset=dataset)
        stages = _train_stages(cfg, ops, step, cfgs, dataset, init.outputs["model"])
        evaluation = _evaluate(cfg, ops, step, cfgs, data_uri, init.outputs["model"], stages["last"])
        export = step(ops.export_triton, "export-triton", model=stages["last"])
        reg = step(ops.register, "register", config_json=cfgs["config"], parent_run_id=parent.output,
                   pipeline_run=run_id, model=stages["last"], eval_metrics=evaluation["summary"],
                   manifest_sha256=prep.outputs["Output"], dataset=dataset, **stages["records"],
                   **evaluation["records"])
        reg.after(export)  # register only what exported cleanly
        verdict = step(ops.gate, "gate", config_json=cfgs["config"], version=reg.output)
        common = {"config_json": cfgs["config"], "version": reg.output, "parent_run_id": parent.output}
        with dsl.If(verdict.output == "promote", name="gate-passed"):
            step(ops.promote, "promote", **common)
        with dsl.Else(name="gate-failed"):
            step(ops.keep_champion, "keep-champion", **common)
        return PipelineOutputs(version=reg.output, verdict=verdict.output, evaluation=evaluation["summary"])

    return omni_pipeline


def _train_stages(cfg: OmniConfig, ops, step, cfgs, dataset, model) -> dict:
    """The stages in order, each from the previous one's checkpoint; the SFT loss filter before sft.
    A stage that needs more than one task pod (`trainjob.needs_trainjob`) gets the TrainJob launcher,
    chosen here, when the pipeline is built. Returns the last checkpoint and register's record inputs."""
    records = {}
    for stage in (s for s in STAGES if s in cfg.stages):
        extra = {}
        if stage == FILTERED_STAGE:  # the loss filter scores its data with the checkpoint it starts from
            scored = step(ops.sft_filter, "sft-loss-filter", config_json=cfgs["sft_filter"], dataset=dataset,
                          model=model)
            extra["sft_filter"] = records["filtered"] = scored.outputs["filtered"]
        trainer = ops.train_stage_trainjob if needs_trainjob(cfg, stage) else ops.train_stage
        task = step(trainer, task_name(stage), config_json=cfgs[stage], stage=stage, dataset=dataset,
                    init_model=model, **extra)
        model = records[stage] = task.outputs["model"]
    return {"last": model, "records": records}


def _evaluate(cfg: OmniConfig, ops, step, cfgs, data_uri, initial, trained) -> dict:
    """The trained model on the benchmarks, and (evaluation.baseline=initial) the initial checkpoint
    in a task of its own: it stays cached while the start and the benchmarks do."""
    common = {"config_json": cfgs["evaluate"], "data_uri": data_uri}
    records = {}
    if cfg.evaluation.baseline == "initial":
        before = step(ops.evaluate, "evaluate-initial", model=initial, **common)
        records["results_before"] = common["baseline"] = before.outputs["results"]
    ev = step(ops.evaluate, "evaluate", model=trained, **common)
    return {"summary": ev.outputs["Output"], "records": {"results": ev.outputs["results"], **records}}
