"""conf/cluster is the one source of truth for pool names, labels, taints and images: the compiled
pipeline, the chart (defaults and render), the generated TrainJobs/InferenceServices and the node
pools in infra/ must all agree with it."""

from __future__ import annotations

import shlex

import pytest
import yaml

from components.cluster import endpoint, trainjob
from components.cluster import render as cluster
from pipelines.cli import DEFAULT_COMPILED


def _tolerations(pool) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in pool.tolerations]


def test_tolerations_are_derived_from_the_taints(cfg) -> None:
    gpu = cfg.cluster.gpu_pool
    assert [(t.key, t.effect) for t in gpu.taints] == [(t.key, t.effect) for t in gpu.tolerations]
    assert all(t.operator == "Exists" for t in gpu.tolerations)
    assert cfg.cluster.cpu_pool.tolerations == []


def test_checked_in_pipeline_places_tasks_on_conf_pools(cfg) -> None:
    docs = list(yaml.safe_load_all(DEFAULT_COMPILED.read_text()))
    containers = docs[0]["deploymentSpec"]["executors"]
    placement = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu, cpu = cfg.cluster.gpu_pool, cfg.cluster.cpu_pool
    images = {cfg.cluster.images.ref("gpu"), cfg.cluster.images.ref("cpu")}
    pools = {"gpu": (gpu.node_selector, _tolerations(gpu)), "cpu": (cpu.node_selector, _tolerations(cpu))}
    for name, executor in containers.items():
        assert executor["container"]["image"] in images, name
        k8s = placement[name]
        where = (k8s["nodeSelector"]["labels"], k8s.get("tolerations", []))
        assert where in pools.values(), f"{name} is placed on no conf pool: {where}"
        if "accelerator" in executor["container"].get("resources", {}):
            assert where == pools["gpu"], f"{name} asks for a GPU off the GPU pool"


def test_chart_defaults_agree_with_conf(cfg) -> None:
    defaults = yaml.safe_load((cluster.CHART_DIR / "values.yaml").read_text())
    cluster.merge_values(defaults, cluster.conf_values(cfg))  # raises ValuesConflict on any drift


def test_rendered_chart_runtime_and_endpoint_agree_with_conf_and_promote(cfg) -> None:
    values = yaml.safe_load((cluster.CHART_DIR / "ci" / "gitops-values.yaml").read_text())
    docs, _ = cluster.render_chart(cfg, values)
    runtime = next(d for d in docs if d["kind"] == "TrainingRuntime")
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == cfg.cluster.gpu_pool.node_selector
    assert pod["tolerations"] == _tolerations(cfg.cluster.gpu_pool)
    assert pod["containers"][0]["image"] == cfg.cluster.images.ref("gpu")
    assert runtime["metadata"]["name"] == cfg.cluster.trainer.runtime

    serving = next(d for d in docs if d["kind"] == "ServingRuntime")
    assert serving["metadata"]["name"] == cfg.cluster.endpoint.runtime
    assert serving["spec"]["containers"][0]["image"] == cfg.cluster.images.ref("serving")

    # The chart's champion and the promote step's champion are the same object.
    chart_isvc = next(d for d in docs if d["kind"] == "InferenceService")
    ep = values["endpoint"]
    ours = endpoint.champion_isvc(cfg, ep["storageUri"], ep["modelVersion"], ep["canaryTrafficPercent"])
    assert chart_isvc["spec"] == ours["spec"]
    assert {k: chart_isvc["metadata"][k] for k in ("name", "namespace")} == \
        {k: ours["metadata"][k] for k in ("name", "namespace")}
    assert ours["metadata"]["labels"].items() <= chart_isvc["metadata"]["labels"].items()


def test_chart_canary_share_is_confs(cfg) -> None:
    """One canary share: the chart's canaryTrafficPercent is null (at rest) or conf's canary_percent."""
    defaults = yaml.safe_load((cluster.CHART_DIR / "values.yaml").read_text())
    assert defaults["endpoint"]["canaryTrafficPercent"] is None
    shares = {p.name: (yaml.safe_load(p.read_text()).get("endpoint") or {}).get("canaryTrafficPercent")
              for p in sorted((cluster.CHART_DIR / "ci").glob("*-values.yaml"))}
    assert shares["gitops-values.yaml"] == cfg.cluster.endpoint.canary_percent
    assert {name: s for name, s in shares.items() if s not in (None, cfg.cluster.endpoint.canary_percent)} == {}
    other = cfg.cluster.endpoint.canary_percent + 15
    conf_share = rf"endpoint\.canaryTrafficPercent={other} .*canary_percent={cfg.cluster.endpoint.canary_percent}"
    with pytest.raises(cluster.ValuesConflict, match=conf_share):
        cluster.render_chart(
            cfg, {"endpoint": {"enabled": True, "storageUri": "s3://b/m", "canaryTrafficPercent": other}}
        )
    # ...and a conf override moves the accepted share with it.
    from components.config import load_config

    moved = load_config([f"cluster.endpoint.canary_percent={other}"])
    docs, _ = cluster.render_chart(
        moved, {"endpoint": {"enabled": True, "storageUri": "s3://b/m", "canaryTrafficPercent": other}}
    )
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == other


def test_trainjob_placement_matches_the_runtime_and_conf(cfg) -> None:
    job = cluster.example_trainjob(cfg)
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"
    ]["template"]["spec"]
    assert pod["nodeSelector"] == cfg.cluster.gpu_pool.node_selector
    assert pod["tolerations"] == _tolerations(cfg.cluster.gpu_pool)
    assert job["spec"]["trainer"]["image"] == cfg.cluster.images.ref("gpu")
    assert (
        job["spec"]["trainer"]["resourcesPerNode"]["limits"][cfg.cluster.gpu_pool.accelerator_type]
        == cfg.cluster.gpu_pool.node_pool.gpus_per_node
    )
    assert trainjob.NODE_JOB == "node"  # the chart's replicated job and container name


def test_checked_in_infra_node_pools_are_up_to_date(cfg) -> None:
    gke = cluster.INFRA_DIR / "gke" / "node-pools.sh"
    kind = cluster.INFRA_DIR / "kind" / "kind-config.yaml"
    stale = "stale: run `omni cluster node-pools` and commit infra/"
    assert gke.read_text() == cluster.gke_node_pools(cfg), stale
    assert yaml.safe_load(kind.read_text()) == cluster.kind_config(cfg), stale


@pytest.mark.parametrize("pool_name", ["gpu_pool", "cpu_pool"])
def test_infra_node_pools_carry_conf_labels_and_taints(cfg, pool_name) -> None:
    pool = getattr(cfg.cluster, pool_name)
    # GKE: parse the gcloud command of this pool.
    script = (cluster.INFRA_DIR / "gke" / "node-pools.sh").read_text().replace("\\\n", " ")
    command = next(line for line in script.splitlines() if f"node-pools create {pool.name} " in line)
    flags = dict(a.split("=", 1) for a in shlex.split(command) if a.startswith("--") and "=" in a)
    assert dict(kv.split("=", 1) for kv in flags["--node-labels"].split(",")) == pool.node_selector
    taints = flags.get("--node-taints", "")
    assert (taints.split(",") if taints else []) == [f"{t.key}={t.value}:{t.effect}" for t in pool.taints]
    if pool.node_pool.gpus_per_node:
        assert f"count={pool.node_pool.gpus_per_node}" in flags["--accelerator"]
    # kind: the worker with this pool's labels carries its taints.
    kind = yaml.safe_load((cluster.INFRA_DIR / "kind" / "kind-config.yaml").read_text())
    node = next(n for n in kind["nodes"] if n.get("labels") == pool.node_selector)
    patches = [yaml.safe_load(p) for p in node.get("kubeadmConfigPatches", [])]
    kind_taints = [t for p in patches for t in p["nodeRegistration"]["taints"]]
    assert [(t["key"], t["effect"]) for t in kind_taints] == [(t.key, t.effect) for t in pool.taints]


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.gpu_pool.accelerator_limit=16", r"accelerator_limit \(16\) exceeds node_pool.gpus_per_node \(8\)"),
        ("cluster.cpu_pool.name=omni-gpu", "gpu_pool.name and cpu_pool.name are both 'omni-gpu'"),
        ("cluster.endpoint.canary_percent=100", "cluster.endpoint.canary_percent"),
        ("cluster.gpu_pool.node_pool.min_nodes=9", r"min_nodes \(9\) > max_nodes \(4\)"),
        ("cluster.target=gke", "cluster.target"),
    ],
)
def test_bad_cluster_config_names_the_field(override, message) -> None:
    from components.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config([override])
