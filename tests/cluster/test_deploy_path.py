"""The documented path (docs/deploy.md) read against the pinned upstreams: one test per thing that
would stop a platform team between the install and a serving endpoint. Rendered manifests of every
values file are checked for the property itself, so each test fails with its fix reverted."""

from __future__ import annotations

import re

import pytest

from components import endpoint
from pipelines import cluster
from pipelines.cluster_check import VALUES_FILES

VARIANTS = {"default": None, **{p.name.removesuffix("-values.yaml"): p for p in VALUES_FILES}}


@pytest.fixture(scope="module")
def charts(cfg) -> dict[str, list[dict]]:
    """The chart's objects for the defaults and each ci/*-values.yaml, as `omni cluster render` makes them."""
    return {name: cluster.render_chart(cfg, cluster.load_values(path))[0] for name, path in VARIANTS.items()}


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


# 2. Tenancy: the Role is bound to the identity the documented KFP install runs tasks as.

def _installed_kfp_namespace() -> str:
    """infra/install.sh installs standalone KFP (env/platform-agnostic) and waits in this namespace."""
    script = (cluster.INFRA_DIR / "install.sh").read_text()
    kfp = script[script.index("\nkfp() {"):]
    assert "env/platform-agnostic" in kfp, "install.sh no longer installs standalone KFP: update cluster.kfp"
    return re.search(r"wait_deployments (\S+)", kfp).group(1)


def test_role_is_bound_to_the_task_identity_of_the_installed_kfp(cfg, charts) -> None:
    # Standalone KFP runs every run as its DefaultPipelineRunnerServiceAccount, `pipeline-runner`,
    # in its own namespace; multi-user Kubeflow as `default-editor` in the profile namespace.
    assert cfg.cluster.kfp.mode == "standalone"
    expected = [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": _installed_kfp_namespace()}]
    for name, docs in charts.items():
        assert _one(docs, "RoleBinding")["subjects"] == expected, name


def test_multi_user_kubeflow_binds_default_editor_in_the_profile_namespace() -> None:
    from pipelines.config import load_config

    multi = load_config(["cluster.kfp.mode=multi-user"])
    docs, _ = cluster.render_chart(multi, {})
    assert _one(docs, "RoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "default-editor", "namespace": multi.cluster.namespace}]


def test_a_values_file_cannot_rebind_the_role_away_from_conf(cfg) -> None:
    other = {"pipelineRunner": {"subjects": [{"kind": "ServiceAccount", "name": "default-editor",
                                              "namespace": "kubeflow-user"}]}}
    with pytest.raises(cluster.ValuesConflict, match="pipelineRunner.subjects"):
        cluster.render_chart(cfg, other)
    with pytest.raises(cluster.ValuesConflict, match="mlflowClientNamespaces"):
        cluster.render_chart(cfg, {"networkPolicies": {"enabled": True, "mlflowClientNamespaces": [],
                                                       "ingressNamespaces": ["knative-serving"]}})


def test_promote_leaves_a_helm_managed_champion_alone(cfg, charts, fake_kube) -> None:
    live = _one(charts["gitops"], "InferenceService")
    key = ("serving.kserve.io", "v1beta1", live["metadata"]["namespace"], "inferenceservices",
           live["metadata"]["name"])
    fake_kube.custom.objects[key] = {**live, "metadata": {**live["metadata"], "generation": 1}}
    new = endpoint.champion_isvc(cfg, "s3://omni-mlflow/artifacts/1/new/artifacts/model", "8")
    with pytest.raises(endpoint.OwnedByHelm, match="endpoint.enabled"):
        endpoint.rollout(cfg, new, fake_kube, sleep=lambda _: None, emit=lambda _: None)
    assert fake_kube.custom.verbs() == []  # nothing was patched
