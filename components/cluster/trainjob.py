"""Multi-node training stages as Kubeflow Trainer `TrainJob`s (`trainer.kubeflow.org/v1alpha1`).

A KFP task is one pod. When a stage asks for more than one node, or for more GPUs than a task pod
gets (`cluster.gpu_pool.accelerator_limit`), the DAG is built with a launcher task for it
(`pipelines/dag.py`, decided by `needs_trainjob` when the pipeline is compiled) that calls `run_stage`:

1. stage the task's inputs (config, dataset, start checkpoint) under `cluster.trainer.staging_uri`,
   because TrainJob pods on other nodes cannot see the task pod's files; the pods stream the
   dataset's shards and media from there (each rank reads only its share), and download only the
   checkpoint, once per node;
2. apply a TrainJob against the chart's TrainingRuntime: the GPU image, `torchrun -m
   components.train_entry` (the same `steps.train` on every rank; rank 0 alone logs and saves),
   resources per node, and the GPU pool's node selector, tolerations and /dev/shm as a runtime patch;
3. wait for it while streaming rank 0's log, and raise `TrainJobFailed` with the job's reason;
4. fetch rank 0's checkpoint into the task's output folder.

Re-running a task (KFP retries) re-attaches to a running TrainJob of the same name, reuses a
completed one and replaces a failed one, so a retry never starts a second copy of a long job.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from components.cluster import kube as k8s
from components.config import OmniConfig, TaskConfig
from model.storage import open_store

TRAINJOB_API_VERSION = "trainer.kubeflow.org/v1alpha1"
# The replicated job and container names of the chart's TrainingRuntime (and the torch runtime's).
NODE_JOB = "node"
PATCH_MANAGER = "omni-platform.io/train-stage"
ENTRY_MODULE = "components.train_entry"
CHECKPOINT_MOUNT = "/checkpoints"  # cluster.trainer.checkpoint_claim, shared by every node pod


class TrainJobFailed(RuntimeError):
    """The TrainJob ended in Failed (or never finished in time); the message carries its reason."""


def needs_trainjob(cfg: OmniConfig | TaskConfig, stage_name: str) -> bool:
    """More than one node, or more GPUs per node than one KFP task pod is given."""
    stage = cfg.stages[stage_name]
    return stage.nodes > 1 or stage.gpus_per_node > cfg.cluster.gpu_pool.accelerator_limit


def trainjob_name(stage_name: str, key: str) -> str:
    """Stable per (stage, inputs): `key` names the task's inputs (its config slice and input artifacts),
    so a retried task finds its job, and a run whose inputs equal an earlier one's reuses that job's
    result; short enough (< 40) for the pod names JobSet derives from it."""
    digest = hashlib.sha256(f"{key}/{stage_name}".encode()).hexdigest()[:10]
    return f"omni-{stage_name.replace('_', '-')}-{digest}"


def build_trainjob(cfg: OmniConfig | TaskConfig, stage_name: str, name: str, staging_uri: str) -> dict[str, Any]:
    """The TrainJob for one stage (a plain dict, validated against the CRD by `kube.apply`)."""
    stage, cluster = cfg.stages[stage_name], cfg.cluster
    gpus = _gpus_per_node(cfg, stage_name)
    secret = cluster.trainer.storage_secret
    # Every rank reads its inputs from object storage; only rank 0 writes the output there.
    env = [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
           for key in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    env += [{"name": env_name, "valueFrom": {"secretKeyRef": {"name": cluster.trainer.mlflow_auth_secret, "key": key,
                                                             "optional": True}}}
            for key, env_name in (("username", "MLFLOW_TRACKING_USERNAME"), ("password", "MLFLOW_TRACKING_PASSWORD"))]
    env += [{"name": k, "value": v} for k, v in cluster.gpu_pool.node_pool.nccl_env.items()]
    trainer = {
        "image": cluster.images.ref("gpu"),
        # torchrun takes nodes, processes per node, rank and rendezvous from the PET_* variables
        # the Trainer's torch plugin sets, so the command names none of them.
        "command": ["torchrun", "-m", ENTRY_MODULE],
        "args": ["--staging", staging_uri, "--stage", stage_name,
                 "--checkpoints", f"{CHECKPOINT_MOUNT}/{name}"],
        "numNodes": stage.nodes, "numProcPerNode": max(gpus, 1), "resourcesPerNode": _node_resources(cfg, gpus),
        "env": env,
    }
    replicated = [{"name": NODE_JOB, "template": {"spec": {"template": {"spec": _pod_patch(cfg)}}}}]
    labels = {"app.kubernetes.io/part-of": "omni-platform", "omni-platform/stage": stage_name.replace("_", "-")}
    return {
        "apiVersion": TRAINJOB_API_VERSION, "kind": "TrainJob",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                           "name": cluster.trainer.runtime},
            "activeDeadlineSeconds": int(cluster.trainer.timeout_hours * 3600),
            "trainer": trainer,
            "runtimePatches": [{"manager": PATCH_MANAGER,
                                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": replicated}}}}],
        },
    }


def _gpus_per_node(cfg: OmniConfig | TaskConfig, stage_name: str) -> int:
    """The stage's GPUs per node, refused when no node of the GPU pool has them or the pool is too small."""
    stage, pool = cfg.stages[stage_name], cfg.cluster.gpu_pool
    gpus = stage.gpus_per_node or pool.accelerator_limit
    if gpus > pool.node_pool.gpus_per_node:
        raise ValueError(f"stages.{stage_name}.gpus_per_node={gpus} but nodes of pool {pool.name!r} have "
                         f"{pool.node_pool.gpus_per_node} GPUs: lower it or change cluster.gpu_pool.node_pool")
    if stage.nodes > pool.node_pool.max_nodes:
        raise ValueError(f"stages.{stage_name}.nodes={stage.nodes} exceeds cluster.gpu_pool.node_pool.max_nodes="
                         f"{pool.node_pool.max_nodes}: the job could never be scheduled")
    return gpus


def _node_resources(cfg: OmniConfig | TaskConfig, gpus: int) -> dict[str, Any]:
    pool = cfg.cluster.gpu_pool
    resources: dict[str, Any] = {"requests": {"cpu": pool.cpu_request, "memory": pool.memory_request},
                                 "limits": {"memory": pool.memory_request}}
    if gpus and pool.accelerator_type:
        resources["requests"][pool.accelerator_type] = resources["limits"][pool.accelerator_type] = gpus
    return resources


def _pod_patch(cfg: OmniConfig | TaskConfig) -> dict[str, Any]:
    """The GPU pool's placement and /dev/shm, patched onto the runtime's node pods."""
    pool = cfg.cluster.gpu_pool
    pod: dict[str, Any] = {"nodeSelector": dict(pool.node_selector),
                           "tolerations": [t.model_dump(exclude_none=True) for t in pool.tolerations]}
    container: dict[str, Any] = {"name": NODE_JOB}
    if pool.shm_size:
        # NCCL exchanges tensors through /dev/shm; the container default of 64 MiB is too small.
        pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": pool.shm_size}}]
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    # The DeepSpeed state on a volume all ranks share and that outlives the pods: a restarted job resumes.
    pod.setdefault("volumes", []).append(
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": cfg.cluster.trainer.checkpoint_claim}})
    container.setdefault("volumeMounts", []).append({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT})
    pod["containers"] = [container]
    return pod


def run_stage(
    cfg: TaskConfig,
    stage_name: str,
    data_dir: Path,
    init_dir: Path,
    out_dir: Path,
    key: str,
    extra_dirs: Mapping[str, Path | None] | None = None,
    kube: k8s.Kube | None = None,
    emit: Callable[[str], None] | None = None,
) -> dict:
    """Run one stage as a TrainJob and leave its checkpoint in `out_dir` (see the module doc).
    Returns the summary `components.steps.training.train` returned on rank 0."""
    emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
    kube = kube or k8s.connect()
    name = trainjob_name(stage_name, key)
    staging_uri = f"{cfg.cluster.trainer.staging_uri.rstrip('/')}/{name}"
    store = open_store(staging_uri)
    job = build_trainjob(cfg, stage_name, name, staging_uri)

    live = k8s.get(kube, job)
    state = _state(live)
    if state == "Failed":
        emit(f"TrainJob {name} failed before ({_failure(live)}); replacing it")
        k8s.delete(kube, job)
        _wait_gone(kube, job, cfg.cluster.trainer.poll_seconds)
        live = None
    if live is None:
        emit(f"staging inputs under {staging_uri}")
        store.write_bytes("config.json", cfg.to_json().encode())
        store.upload_dir(data_dir, "inputs/data")
        store.upload_dir(init_dir, "inputs/init")
        for key, path in (extra_dirs or {}).items():
            if path is not None:
                store.upload_dir(path, f"inputs/{key}")
        k8s.apply(kube, job)
        emit(
            f"created TrainJob {cfg.cluster.namespace}/{name}: {job['spec']['trainer']['numNodes']} node(s) x "
            f"{job['spec']['trainer']['numProcPerNode']} process(es)"
        )
    else:
        emit(f"attaching to existing TrainJob {cfg.cluster.namespace}/{name} ({state or 'running'})")

    wait(kube, job, cfg.cluster.trainer.timeout_hours * 3600, cfg.cluster.trainer.poll_seconds, emit)
    store.download_dir("output/model", out_dir)
    return json.loads(store.read_bytes("output/result.json"))


def wait(
    kube: k8s.Kube,
    job: Mapping[str, Any],
    timeout_s: float,
    poll_s: float,
    emit: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Block until the TrainJob is Complete (returns it) or Failed (raises TrainJobFailed with its
    reason), streaming rank 0's log meanwhile."""
    meta = job["metadata"]
    stop = threading.Event()
    # JobSet names it after the TrainJob; completion index 0 of the node job is rank 0.
    selector = (
        f"jobset.sigs.k8s.io/jobset-name={meta['name']},"
        f"jobset.sigs.k8s.io/replicatedjob-name={NODE_JOB},batch.kubernetes.io/job-completion-index=0"
    )
    follower = k8s.follow_logs(kube, meta["namespace"], selector, NODE_JOB, emit, stop, poll_s)
    deadline = clock() + timeout_s
    try:
        while True:
            live = k8s.get(kube, job)
            if live is None:
                raise TrainJobFailed(f"TrainJob {meta['namespace']}/{meta['name']} disappeared (deleted by someone?)")
            state = _state(live)
            if state == "Complete":
                emit(f"TrainJob {meta['name']} complete")
                return live
            if state == "Failed":
                raise TrainJobFailed(f"TrainJob {meta['namespace']}/{meta['name']} failed: {_failure(live)}")
            if clock() > deadline:
                raise TrainJobFailed(
                    f"TrainJob {meta['namespace']}/{meta['name']} did not finish within "
                    f"{timeout_s:.0f}s (cluster.trainer.timeout_hours); it is left running"
                )
            time.sleep(poll_s)
    finally:
        stop.set()
        follower.join(timeout=poll_s)


def _state(live: Mapping[str, Any] | None) -> str | None:
    for kind in ("Failed", "Complete"):
        cond = k8s.condition(live, kind)
        if cond and cond.get("status") == "True":
            return kind
    return None


def _failure(live: Mapping[str, Any] | None) -> str:
    cond = k8s.condition(live, "Failed") or {}
    reason, message = cond.get("reason") or "unknown reason", cond.get("message") or ""
    jobs = [
        f"{j.get('name')}: {j.get('failed', 0)} failed"
        for j in (live or {}).get("status", {}).get("jobsStatus") or []
        if j.get("failed")
    ]
    return f"{reason}: {message}".rstrip(": ") + (f" ({'; '.join(jobs)})" if jobs else "")


def _wait_gone(kube: k8s.Kube, job: Mapping[str, Any], poll_s: float, attempts: int = 60) -> None:
    for _ in range(attempts):
        if k8s.get(kube, job) is None:
            return
        time.sleep(poll_s)
    raise TrainJobFailed(f"TrainJob {job['metadata']['name']} is still being deleted; retry the task later")


def local_workdir() -> Path:
    """Where a TrainJob pod puts its inputs and outputs (the image's root FS is read-only)."""
    return Path(os.environ.get("OMNI_TRAINJOB_WORKDIR") or Path(tempfile.gettempdir()) / "omni-trainjob")
