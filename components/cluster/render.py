"""Everything the platform applies to a cluster, rendered offline from the config (`omni cluster render`).

conf/cluster is the one source of truth for images, pool labels/taints and the endpoint: the chart
values it owns are filled from it (`conf_values`), and a values file that tries to set one of them
differently is refused rather than silently producing a cluster that disagrees with the pipeline.

Output (`render_all`):
    00-namespace.yaml                  the namespace, with Pod Security "restricted" enforced
    10-chart.yaml                      charts/omni-platform rendered with helm-python-sdk
    20-champion-inferenceservice.yaml  what the promote step applies (same builder as promote)
    30-trainjob-example.yaml           a 2-node TrainJob as a multi-node stage creates it
    node-pools/gke/node-pools.sh       GKE node pools (gcloud), labels and taints from conf
    node-pools/kind/kind-config.yaml   a local kind cluster with the same labels and taints
    NOTES.txt                          the chart's post-install notes
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from components.cluster import endpoint, trainjob
from components.config import OmniConfig, PoolConfig
from serving.manifests import validate_custom_resource, write_manifest

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "omni-platform"
INFRA_DIR = REPO / "infra"
RELEASE = "omni"
# API groups whose kinds are validated against serving/crds rather than the core OpenAPI schemas.
CUSTOM_GROUPS = ("serving.kserve.io", "trainer.kubeflow.org")


class ValuesConflict(ValueError):
    """A values file sets a key conf/cluster owns to a different value."""


def _pool_values(pool: PoolConfig) -> dict[str, Any]:
    return {"nodeSelector": dict(pool.node_selector),
            "tolerations": [t.model_dump(exclude_none=True) for t in pool.tolerations]}


def conf_values(cfg: OmniConfig) -> dict[str, Any]:
    """The chart values conf/cluster (and serving.model_name) own."""
    c, ep = cfg.cluster, cfg.cluster.endpoint
    task_ns, task_sa = c.kfp.task_identity(c.namespace)
    return {
        "images": {k: getattr(c.images, k) for k in ("registry", "tag", "cpu", "gpu", "serving")},
        "pools": {"gpu": _pool_values(c.gpu_pool), "cpu": _pool_values(c.cpu_pool)},
        "secrets": {"storage": c.trainer.storage_secret, "mlflowAuth": c.trainer.mlflow_auth_secret},
        "mlflow": {"artifactsDestination": ep.mlflow_artifacts_root},
        "servingRuntime": {"name": ep.runtime, "startupTimeoutSeconds": int(ep.startup_timeout_s)},
        "endpoint": {"name": cfg.serving.model_name, "serviceAccount": ep.service_account, "cpu": ep.cpu,
                     "memory": ep.memory, "gpu": ep.gpu, "minReplicas": ep.min_replicas,
                     "maxReplicas": ep.max_replicas, "containerConcurrency": ep.container_concurrency,
                     "progressDeadlineSeconds": int(ep.progress_deadline_s),
                     "timeoutSeconds": endpoint.request_timeout_s(cfg)},
        "trainer": {"runtime": c.trainer.runtime, "stagingUri": c.trainer.staging_uri,
                    "checkpointClaim": c.trainer.checkpoint_claim, "maxRestarts": c.trainer.max_restarts},
        # The identity KFP runs tasks as (cluster.kfp): promote/rollback and TrainJob launchers use it.
        "pipelineRunner": {"subjects": [{"kind": "ServiceAccount", "name": task_sa, "namespace": task_ns}]},
    }


def merge_values(user: Mapping[str, Any], owned: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """`user` values with the conf-owned ones laid over them; a differing user value is an error."""
    out = copy.deepcopy(dict(user))
    for key, value in owned.items():
        where = f"{path}.{key}" if path else key
        if isinstance(value, Mapping) and key not in ("nodeSelector",):
            mine = out.get(key, {})
            if not isinstance(mine, Mapping):
                raise ValuesConflict(f"{where}: expected a mapping, got {mine!r}")
            out[key] = merge_values(mine, value, where)
        elif key in out and out[key] != value:
            raise ValuesConflict(f"values file sets {where}={out[key]!r} but conf/cluster says {value!r}: "
                                 "change it in conf/cluster (or with an override such as cluster.images.tag=...)")
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_canary(cfg: OmniConfig, values: Mapping[str, Any]) -> None:
    """The chart's `endpoint.canaryTrafficPercent` is either null (the champion at rest: all
    traffic) or the share promote's rollout uses, `cluster.endpoint.canary_percent`: one canary
    share for the pipeline and for a Helm-managed champion."""
    share = (values.get("endpoint") or {}).get("canaryTrafficPercent")
    # 0 is KServe's own rollback: all traffic back to the last rolled-out revision.
    if share not in (None, 0) and share != cfg.cluster.endpoint.canary_percent:
        raise ValuesConflict(f"values file sets endpoint.canaryTrafficPercent={share!r} but conf/cluster says "
                             f"cluster.endpoint.canary_percent={cfg.cluster.endpoint.canary_percent}: use that share "
                             "(or null for all traffic), or change cluster.endpoint.canary_percent")


def check_tenancy(cfg: OmniConfig, values: Mapping[str, Any]) -> None:
    """Task pods outside the release namespace must be let through to MLflow by the NetworkPolicies."""
    task_ns, _ = cfg.cluster.kfp.task_identity(cfg.cluster.namespace)
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["networkPolicies"]
    policies = {**defaults, **(values.get("networkPolicies") or {})}
    allowed = policies.get("mlflowClientNamespaces") or []
    if policies.get("enabled", True) and task_ns != cfg.cluster.namespace and task_ns not in allowed:
        raise ValuesConflict(f"pipeline tasks run in namespace {task_ns!r} (cluster.kfp) but "
                             f"networkPolicies.mlflowClientNamespaces={allowed!r} does not let them reach MLflow: "
                             f"add {task_ns!r}")


def load_values(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a values file must be a YAML mapping")
    return data


def render_chart(cfg: OmniConfig, values: Mapping[str, Any] | None = None,
                 chart_dir: Path = CHART_DIR) -> tuple[list[dict[str, Any]], str]:
    """The chart's manifests (documents in template order) and its NOTES.txt, for the release in
    cluster.namespace. values.schema.json is enforced by Helm."""
    from helm_python import Chart

    merged = merge_values(values or {}, conf_values(cfg))
    rendered = Chart.load(str(chart_dir)).render(merged, name=RELEASE, namespace=cfg.cluster.namespace,
                                                 is_install=True)
    check_tenancy(cfg, merged)
    check_canary(cfg, merged)  # after Helm, so values.schema.json reports out-of-range values first
    docs, notes = [], ""
    for template in sorted(rendered):
        if template.endswith("NOTES.txt"):
            notes = rendered[template]
            continue
        docs.extend(d for d in yaml.safe_load_all(rendered[template]) if d)
    return docs, notes


def namespace_manifest(cfg: OmniConfig) -> dict[str, Any]:
    """The platform's namespace: Pod Security `cluster.pod_security` enforced (restricted by default),
    and "restricted" always audited and warned about."""
    labels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")}
    labels["pod-security.kubernetes.io/enforce"] = cfg.cluster.pod_security
    labels["pod-security.kubernetes.io/enforce-version"] = "latest"
    labels = {**labels, "app.kubernetes.io/part-of": "omni-platform"}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cfg.cluster.namespace, "labels": labels}}


def example_trainjob(cfg: OmniConfig, stage_name: str = "sft") -> dict[str, Any]:
    """The TrainJob a 2-node stage on full GPU nodes creates (the stage config with nodes/GPUs raised)."""
    gpus = cfg.cluster.gpu_pool.node_pool.gpus_per_node
    stage = cfg.stages[stage_name].model_copy(update={"nodes": 2, "gpus_per_node": gpus})
    cfg = cfg.model_copy(update={"stages": {**cfg.stages, stage_name: stage}})
    name = trainjob.trainjob_name(stage_name, "example-run")
    staging = f"{cfg.cluster.trainer.staging_uri.rstrip('/')}/{name}"
    return trainjob.build_trainjob(cfg, stage_name, name, staging)


def champion_example(cfg: OmniConfig, endpoint_values: Mapping[str, Any]) -> dict[str, Any]:
    """What promote applies for the model at endpoint.storageUri (or an example location)."""
    root = (cfg.cluster.endpoint.mlflow_artifacts_root or "s3://omni-mlflow/artifacts").rstrip("/")
    storage = endpoint_values.get("storageUri") or f"{root}/1/example-run/artifacts/model"
    version = endpoint_values.get("modelVersion") or None
    return endpoint.champion_isvc(
        cfg, storage, str(version) if version else None, canary_percent=endpoint_values.get("canaryTrafficPercent")
    )


def gke_node_pools(cfg: OmniConfig) -> str:
    """gcloud commands creating the GPU and CPU node pools with conf's labels and taints."""
    lines = [
        "#!/usr/bin/env bash",
        "# GKE node pools for omni-platform. GENERATED from conf/cluster by `omni cluster node-pools`:",
        "# edit conf/cluster and regenerate; tests/components/cluster/test_source_of_truth.py fails on drift.",
        "# Usage: CLUSTER=my-cluster LOCATION=us-central1 [PROJECT=my-project] bash infra/gke/node-pools.sh",
        "set -euo pipefail",
        ': "${CLUSTER:?set CLUSTER}" "${LOCATION:?set LOCATION}"',
        'project=(); [ -n "${PROJECT:-}" ] && project=(--project "$PROJECT")',
        "",
    ]
    for pool in (cfg.cluster.cpu_pool, cfg.cluster.gpu_pool):
        np = pool.node_pool
        labels = ",".join(f"{k}={v}" for k, v in pool.node_selector.items())
        args = [
            f"--machine-type={np.machine_type}",
            f"--disk-size={np.disk_size_gb}",
            "--enable-autoscaling",
            f"--min-nodes={np.min_nodes}",
            f"--max-nodes={np.max_nodes}",
            f"--node-labels={labels}",
        ]
        if pool.taints:
            args.append("--node-taints=" + ",".join(f"{t.key}={t.value or ''}:{t.effect}" for t in pool.taints))
        if np.gpus_per_node:
            # GKE installs the driver and the device plugin that advertises nvidia.com/gpu.
            args.append(f"--accelerator=type={np.gpu_model},count={np.gpus_per_node},gpu-driver-version=latest")
        lines.append(
            f"# {pool.name}: "
            + (
                "GPU stages, evaluation, export, the predictor"
                if np.gpus_per_node
                else "data prep, registry, promotion, MLflow"
            )
        )
        lines.append(f'gcloud container node-pools create {pool.name} --cluster "$CLUSTER" --location "$LOCATION" \\')
        lines.append('  "${project[@]}" \\')
        lines.append("  " + " \\\n  ".join(shlex.quote(a) for a in args))
        lines.append("")
    return "\n".join(lines)


class _BlockStrings(yaml.SafeDumper):
    """Multi-line strings (kubeadm patches) as literal blocks, as people write them."""


_BlockStrings.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def kind_config(cfg: OmniConfig) -> dict[str, Any]:
    """A local kind cluster: one worker per pool with the pool's labels and taints (kind has no
    GPUs: the GPU worker exercises placement only)."""
    nodes: list[dict[str, Any]] = [{"role": "control-plane"}]
    for pool in (cfg.cluster.cpu_pool, cfg.cluster.gpu_pool):
        node: dict[str, Any] = {"role": "worker", "labels": dict(pool.node_selector)}
        if pool.taints:
            taints = [{"key": t.key, "value": t.value or "", "effect": t.effect} for t in pool.taints]
            node["kubeadmConfigPatches"] = [
                yaml.safe_dump({"kind": "JoinConfiguration", "nodeRegistration": {"taints": taints}}, sort_keys=False)
            ]
        nodes.append(node)
    return {"kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4", "name": "omni-platform", "nodes": nodes}


def write_node_pools(cfg: OmniConfig, out_dir: Path) -> list[Path]:
    """infra/-style node pool files under `out_dir` (gke/node-pools.sh, kind/kind-config.yaml)."""
    gke = out_dir / "gke" / "node-pools.sh"
    gke.parent.mkdir(parents=True, exist_ok=True)
    gke.write_text(gke_node_pools(cfg))
    kind = out_dir / "kind" / "kind-config.yaml"
    kind.parent.mkdir(parents=True, exist_ok=True)
    kind.write_text(
        "# A local dev cluster for omni-platform. GENERATED from conf/cluster by `omni cluster node-pools`.\n"
        + yaml.dump(kind_config(cfg), Dumper=_BlockStrings, sort_keys=False)
    )
    return [gke, kind]


def validate_custom_resources(docs: list[dict[str, Any]]) -> int:
    """jsonschema against serving/crds for every custom resource (unknown fields fail). Returns the count."""
    count = 0
    for doc in docs:
        if doc.get("apiVersion", "").split("/")[0] in CUSTOM_GROUPS:
            validate_custom_resource(doc)
            count += 1
    return count


def render_all(cfg: OmniConfig, out_dir: Path, values_file: Path | None = None) -> list[Path]:
    """Write every manifest the platform would apply into `out_dir` (see the module doc)."""
    values = load_values(values_file)
    chart_docs, notes = render_chart(cfg, values)
    isvc = champion_example(cfg, values.get("endpoint") or {})
    job = example_trainjob(cfg)
    validate_custom_resources([*chart_docs, isvc, job])
    chart_isvc = [d for d in chart_docs if d["kind"] == "InferenceService"]
    if chart_isvc and chart_isvc[0]["spec"] != isvc["spec"]:
        raise AssertionError(
            "the chart's InferenceService differs from the one promote applies: "
            "charts/omni-platform/templates/inferenceservice.yaml and components/cluster/endpoint.py disagree"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        write_manifest(namespace_manifest(cfg), out_dir / "00-namespace.yaml"),
        write_manifest(chart_docs, out_dir / "10-chart.yaml"),
        write_manifest(isvc, out_dir / "20-champion-inferenceservice.yaml"),
        write_manifest(job, out_dir / "30-trainjob-example.yaml"),
        *write_node_pools(cfg, out_dir / "node-pools"),
    ]
    (out_dir / "NOTES.txt").write_text(notes)
    return [*written, out_dir / "NOTES.txt"]


def manifest_docs(out_dir: Path) -> list[dict[str, Any]]:
    """Every Kubernetes object in a render output (node-pool files excluded)."""
    docs = []
    for path in sorted(out_dir.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs
