"""The omni training DAG (SPEC §8):

    data-prep -> init-model -> image-1 -> image-2 -> image-3 -> video -> audio -> omni-align
      -> sft-loss-filter -> sft -> evaluate -> export-triton -> register -> gate
      -> dsl.If(promote) / Else(keep champion)

GPU stages carry the accelerator, node selector, toleration and a memory-backed /dev/shm from the
cluster config; CPU steps go to the CPU pool. Both are no-ops under `kfp.local`.
"""

from kfp import dsl, kubernetes

from components.config import STAGE_ORDER, OmniConfig, PoolConfig
from components.pipeline_components import make_components
from components.trainjob import needs_trainjob

PIPELINE_NAME = "omni-platform"
# Deterministic steps are cached; steps with side effects in MLflow are not.
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


def build_pipeline(cfg: OmniConfig):
    """The pipeline function for this config; the resolved config is its default parameter, so a
    compiled YAML is self-contained and `key=value` at submit time can still replace it."""
    cluster = cfg.cluster
    ops = make_components({"cpu": cluster.images.ref("cpu"), "gpu": cluster.images.ref("gpu")})
    pools = {"cpu": cluster.cpu_pool, "gpu": cluster.gpu_pool}

    def step(component, name: str, **inputs) -> dsl.PipelineTask:
        task = component(**inputs).set_display_name(name)
        task.set_caching_options(cluster.caching and name not in UNCACHED)
        _storage_env(task, cluster.trainer.storage_secret)
        _mlflow_auth_env(task, cluster.trainer.mlflow_auth_secret)
        return _place(task, pools[component.pool], 0 if name in UNCACHED else cluster.retries)

    @dsl.pipeline(name=PIPELINE_NAME, description="Omni-modal LLM: data prep, staged training, evaluation, "
                  "Triton export, MLflow registry, gated promotion to KServe")
    def omni_pipeline(data_uri: str, config_json: str = cfg.to_json()) -> str:
        run_id = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
        parent = step(ops.start_tracking, "start-tracking", config_json=config_json, pipeline_run=run_id)
        common = {"config_json": config_json, "parent_run_id": parent.output}
        prep = step(ops.data_prep, "data-prep", data_uri=data_uri, **common)
        init = step(ops.init_model, "init-model", config_json=config_json, dataset=prep.outputs["dataset"])
        trained = _train_stages(cfg, ops, step, common, prep.outputs["dataset"], init.outputs["model"])
        ev = step(ops.evaluate, "evaluate", data_uri=data_uri, model=trained, baseline=init.outputs["model"],
                  **common)
        export = step(ops.export_triton, "export-triton", model=trained)
        reg = step(ops.register, "register", pipeline_run=run_id, model=trained, eval_metrics=ev.outputs["Output"],
                   manifest_sha256=prep.outputs["Output"], **common)
        reg.after(export)  # register only what exported cleanly
        verdict = step(ops.gate, "gate", config_json=config_json, version=reg.output)
        with dsl.If(verdict.output == "promote", name="gate-passed"):
            step(ops.promote, "promote", version=reg.output, **common)
        with dsl.Else(name="gate-failed"):
            step(ops.keep_champion, "keep-champion", version=reg.output, **common)
        return ev.outputs["Output"]

    return omni_pipeline


def _train_stages(cfg: OmniConfig, ops, step, common: dict, dataset, model):
    """The stages in order, each from the previous one's checkpoint; the SFT loss filter before sft.
    A stage that needs more than one task pod (`trainjob.needs_trainjob`) gets the TrainJob launcher,
    chosen here, when the pipeline is built. Returns the last checkpoint."""
    for stage in (s for s in STAGE_ORDER if s in cfg.stages):
        extra = {}
        if stage == "sft":  # the loss filter scores SFT data with the checkpoint SFT starts from
            scored = step(ops.sft_filter, "sft-loss-filter", dataset=dataset, model=model, **common)
            extra["sft_filter"] = scored.outputs["filtered"]
        trainer = ops.train_stage_trainjob if needs_trainjob(cfg, stage) else ops.train_stage
        task = step(trainer, stage.replace("_", "-"), stage=stage, dataset=dataset, init_model=model, **common,
                    **extra)
        model = task.outputs["model"]
    return model
