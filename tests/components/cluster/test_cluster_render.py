"""`omni cluster render`: the chart through helm-python-sdk, the champion ISVC, an example
TrainJob and node pools; values.schema.json and the conf-owned values refuse bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.cluster import render as cluster
from pipelines.cli import main as omni

PRODUCTION = cluster.CHART_DIR / "ci" / "production-values.yaml"
GITOPS = cluster.CHART_DIR / "ci" / "gitops-values.yaml"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    from components.config import load_config

    out = tmp_path_factory.mktemp("render")
    cfg = load_config()
    cluster.render_all(cfg, out / "default")
    cluster.render_all(cfg, out / "production", PRODUCTION)
    cluster.render_all(cfg, out / "gitops", GITOPS)
    return {"default": out / "default", "production": out / "production", "gitops": out / "gitops"}


def kinds(out: Path) -> set[str]:
    return {d["kind"] for d in cluster.manifest_docs(out)}


def test_render_writes_every_manifest(rendered) -> None:
    out = rendered["default"]
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["00-namespace.yaml", "10-chart.yaml", "20-champion-inferenceservice.yaml",
                     "30-trainjob-example.yaml", "NOTES.txt", "node-pools/gke/node-pools.sh",
                     "node-pools/kind/kind-config.yaml"]
    assert kinds(out) == {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment", "Service",
                          "NetworkPolicy", "ServingRuntime", "TrainingRuntime", "InferenceService", "TrainJob",
                          "PersistentVolumeClaim", "CronJob"}
    assert kinds(rendered["production"]) == kinds(out) | {"StatefulSet"}
    assert "omni-mlflow" in (out / "NOTES.txt").read_text()
    assert cluster.validate_custom_resources(cluster.manifest_docs(rendered["gitops"])) == 5


def _chart_docs(out: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all((out / "10-chart.yaml").read_text()) if d]


def test_production_values_enable_bundled_services_and_leave_the_champion_to_the_pipeline(rendered) -> None:
    docs = cluster.manifest_docs(rendered["production"])
    sets = {d["metadata"]["name"] for d in docs if d["kind"] == "StatefulSet"}
    assert sets == {"omni-postgresql", "omni-minio"}
    # Helm owning a champion with a fixed storageUri would undo every promote on the next upgrade.
    assert not [d for d in _chart_docs(rendered["production"]) if d["kind"] == "InferenceService"]
    chart_isvc = next(d for d in _chart_docs(rendered["gitops"]) if d["kind"] == "InferenceService")
    assert chart_isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert chart_isvc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_nothing_cluster_wide_and_least_privilege_rbac(rendered) -> None:
    for out in rendered.values():
        docs = cluster.manifest_docs(out)
        assert not {"ClusterRole", "ClusterRoleBinding"} & kinds(out)
        namespaced = [d for d in docs if d["kind"] != "Namespace"]
        assert {d["metadata"]["namespace"] for d in namespaced} == {"kubeflow-user"}
        role = next(d for d in docs if d["kind"] == "Role")
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        granted = {
            (g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
        }
        # Exactly what components/cluster/kube.py calls: custom objects, pods and their logs. Secrets reach
        # task pods through secretKeyRef (resolved by the kubelet), so the Role grants none.
        assert granted == {
            ("serving.kserve.io", "inferenceservices"): {"get", "list", "watch", "create", "patch"},
            ("trainer.kubeflow.org", "trainjobs"): {"get", "list", "watch", "create", "patch", "delete"},
            ("", "pods"): {"get", "list", "watch"},
            ("", "pods/log"): {"get"},
        }


def test_pod_security_restricted_everywhere(rendered) -> None:
    """Every container the chart defines, including those inside the KServe and Trainer runtimes."""

    def containers(doc):
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind in ("Deployment", "StatefulSet"):
            return spec["template"]["spec"], spec["template"]["spec"]["containers"]
        if kind == "ServingRuntime":
            return {}, spec["containers"]
        if kind == "TrainingRuntime":
            pod = spec["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
            return pod, pod["containers"]
        return None, []

    seen = 0
    ns = yaml.safe_load((rendered["default"] / "00-namespace.yaml").read_text())
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in cluster.manifest_docs(rendered["production"]):
        pod, ctrs = containers(doc)
        if pod and pod.get("securityContext"):
            assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
        for c in ctrs:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert sc["runAsUser"] > 10000
            assert not any(e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", [])), "secrets as files"
            seen += 1
    assert seen == 5  # mlflow, postgresql, minio, predictor, trainer


def test_endpoint_requires_a_token_by_default(rendered) -> None:
    runtime = next(d for d in cluster.manifest_docs(rendered["default"]) if d["kind"] == "ServingRuntime")
    env = {e["name"]: e.get("value") for e in runtime["spec"]["containers"][0]["env"]}
    assert env["OMNI_API_TOKEN_FILE"] == "/var/run/secrets/omni/api/token"
    assert runtime["spec"]["volumes"][1] == {"name": "api-token", "secret": {"secretName": "omni-endpoint-token"}}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"endpoint": {"canaryTrafficPercent": 150}}, "canaryTrafficPercent"),
        ({"mlflow": {"artifactsDestnation": "s3://x"}}, "artifactsDestnation"),
        ({"postgresql": {"image": "postgres:latest"}}, "postgresql/image"),
        ({"securityContext": {"runAsUser": 0, "runAsGroup": 0}}, "runAsUser"),
        ({"images": {"pullSecrets": [{"name": "Not_A_Label"}]}}, "pullSecrets"),
        ({"endpoint": {"enabled": True}}, "storageUri"),
    ],
)
def test_values_schema_rejects_bad_values_naming_the_field(cfg, values, message) -> None:
    from helm_python import HelmError

    with pytest.raises(HelmError, match=message):
        cluster.render_chart(cfg, values)


def test_values_may_not_contradict_conf(cfg, tmp_path) -> None:
    with pytest.raises(cluster.ValuesConflict, match=r"images\.tag='9\.9' but conf/cluster says '0\.1\.0'"):
        cluster.render_chart(cfg, {"images": {"tag": "9.9"}})
    cluster.render_chart(cfg, {"images": {"tag": "0.1.0"}})  # repeating conf is fine
    bad = tmp_path / "v.yaml"
    bad.write_text("pools: {gpu: {nodeSelector: {omni-platform/pool: gpu-a100}, tolerations: []}}\n")
    assert omni(["cluster", "render", "--out", str(tmp_path / "o"), "--values", str(bad)]) == 2


def test_cli_render_and_overrides_flow_into_every_manifest(tmp_path, capsys) -> None:
    assert (
        omni(["cluster", "render", "--out", str(tmp_path), "cluster.images.tag=0.2.0", "cluster.namespace=omni-prod"])
        == 0
    )
    text = "".join(p.read_text() for p in tmp_path.glob("*.yaml"))
    assert "omni-serving:0.2.0" in text and "omni-train-gpu:0.2.0" in text and ":0.1.0" not in text
    assert {d["metadata"].get("namespace", d["metadata"]["name"]) for d in cluster.manifest_docs(tmp_path)} == {
        "omni-prod"
    }
    assert "10-chart.yaml" in capsys.readouterr().out


def test_help_answers_what_render_and_rollback_do(capsys) -> None:
    for argv in (["cluster", "render", "--help"], ["rollback", "--help"]):
        with pytest.raises(SystemExit):
            omni(argv)
    out = capsys.readouterr().out
    assert "conf/cluster" in out and "--values" in out and "previous-champion" in out and "cluster.target" in out
