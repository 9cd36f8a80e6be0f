"""Promotion on the cluster: the champion InferenceService, canary then full traffic, rollback.
The registry is a real MLflow (sqlite); the Kubernetes API is an in-process fake of the client
objects (tests/components/cluster/fake_kube.py), not a real API server."""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException

from components.cluster import endpoint
from components.cluster.kube import KubeError
from components.registry import tracking
from components.steps import lifecycle
from serving.manifests import validate_custom_resource
from tests.components.cluster.fake_kube import FakeKServe


def _cluster_cfg(cfg, tmp_path, **endpoint_update):
    ep = cfg.cluster.endpoint.model_copy(update={"canary_hold_s": 30, "ready_timeout_s": 5, **endpoint_update})
    cluster = cfg.cluster.model_copy(update={"target": "kubernetes", "endpoint": ep})
    run = cfg.run.model_copy(update={"workdir": str(tmp_path / "omni")})
    return cfg.model_copy(update={"cluster": cluster, "run": run})


def test_champion_isvc_is_valid_and_placed_on_the_gpu_pool(cfg) -> None:
    isvc = endpoint.champion_isvc(cfg, "s3://omni-mlflow/artifacts/1/r/artifacts/model", "7")
    validate_custom_resource(isvc)
    p = isvc["spec"]["predictor"]
    assert isvc["metadata"] == {
        "name": cfg.serving.model_name,
        "namespace": cfg.cluster.namespace,
        "labels": {"app.kubernetes.io/part-of": "omni-platform", "omni-platform/model-version": "7"},
        "annotations": {"serving.knative.dev/progress-deadline": "2700s"},
    }
    assert p["model"]["runtime"] == cfg.cluster.endpoint.runtime and p["serviceAccountName"] == "omni-serving"
    assert p["model"]["resources"]["limits"]["nvidia.com/gpu"] == cfg.cluster.endpoint.gpu
    assert p["nodeSelector"] == cfg.cluster.gpu_pool.node_selector and p["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "canaryTrafficPercent" not in p


def test_mlflow_artifact_uris_become_object_storage_uris(cfg) -> None:
    assert (
        endpoint.storage_uri(cfg, "mlflow-artifacts:/1/abc/artifacts/model")
        == "s3://omni-mlflow/artifacts/1/abc/artifacts/model"
    )
    assert endpoint.storage_uri(cfg, "s3://b/m") == "s3://b/m"
    no_root = cfg.model_copy(
        update={
            "cluster": cfg.cluster.model_copy(
                update={"endpoint": cfg.cluster.endpoint.model_copy(update={"mlflow_artifacts_root": None})}
            )
        }
    )
    with pytest.raises(ValueError, match="cluster.endpoint.mlflow_artifacts_root"):
        endpoint.storage_uri(no_root, "mlflow-artifacts:/1/abc")


def test_first_rollout_goes_straight_to_full_traffic(cfg, fake_kube, tmp_path) -> None:
    c = _cluster_cfg(cfg, tmp_path)
    fake_kube.custom.controller = FakeKServe()
    slept: list[float] = []
    live = endpoint.rollout(
        c, endpoint.champion_isvc(c, "s3://m/1"), fake_kube, sleep=slept.append, emit=lambda _: None
    )
    assert fake_kube.custom.verbs() == ["create"] and slept == []
    assert "canaryTrafficPercent" not in live["spec"]["predictor"]


def test_update_is_canary_first_then_full(cfg, fake_kube, tmp_path) -> None:
    c = _cluster_cfg(cfg, tmp_path)
    fake_kube.custom.controller = FakeKServe()
    quiet = {"emit": lambda _: None}
    endpoint.rollout(c, endpoint.champion_isvc(c, "s3://m/1"), fake_kube, sleep=lambda _: None, **quiet)
    fake_kube.custom.calls.clear()
    fake_kube.core.pods["omni-predictor-00002-deployment-a"] = "Running"
    slept: list[float] = []
    live = endpoint.rollout(c, endpoint.champion_isvc(c, "s3://m/2"), fake_kube, sleep=slept.append, **quiet)

    patches = [body for verb, _, body in fake_kube.custom.calls if verb == "patch"]
    assert [p["spec"]["predictor"]["canaryTrafficPercent"] for p in patches] == [10, None]
    assert patches[0]["spec"]["predictor"]["model"]["storageUri"] == "s3://m/2"
    assert sum(slept) == 30  # the canary was held (and watched) before all traffic moved
    assert live["spec"]["predictor"]["model"]["storageUri"] == "s3://m/2"
    assert "canaryTrafficPercent" not in live["spec"]["predictor"]  # the null removed it


def test_a_revision_that_cannot_load_fails_the_rollout_with_kserves_reason(cfg, fake_kube, tmp_path) -> None:
    c = _cluster_cfg(cfg, tmp_path)

    def broken(obj):
        obj["status"] = {
            "observedGeneration": obj["metadata"]["generation"],
            "modelStatus": {"transitionStatus": "BlockedByFailedLoad"},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "ModelLoadFailed",
                    "message": "omni_config.json not found in /mnt/models",
                }
            ],
        }

    fake_kube.custom.controller = broken
    with pytest.raises(endpoint.RolloutFailed, match="BlockedByFailedLoad: Ready=False ModelLoadFailed omni_config"):
        endpoint.rollout(c, endpoint.champion_isvc(c, "s3://m/1"), fake_kube, sleep=lambda _: None, emit=lambda _: None)


def test_promote_and_rollback_apply_before_moving_champion(cfg, fake_kube, tmp_path, monkeypatch) -> None:
    c = _cluster_cfg(cfg, tmp_path, canary_hold_s=0)
    uri = lifecycle.mlflow_uri(c)
    model = c.tracking.registered_model
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"w")
    run_id = tracking.start_pipeline_run(uri, c.tracking.experiment, "p")
    tags = {"pipeline_run_id": "p", "data_manifest_sha256": "d", "config_sha256": "c", "git_sha": "g"}
    v1, v2 = (tracking.register_model_version(uri, model, ckpt, run_id, tags, metrics={}) for _ in range(2))

    # A rollout that fails leaves the champion where it was.
    fake_kube.custom.controller = lambda obj: obj.update(status={"modelStatus": {"transitionStatus": "InvalidSpec"}})
    with pytest.raises(endpoint.RolloutFailed):
        lifecycle.promote(c, v1, tmp_path / "m0", kube=fake_kube)
    assert tracking.get_alias_version(uri, model, tracking.CHAMPION) is None

    fake_kube.custom.controller = FakeKServe()
    fake_kube.custom.objects.clear()
    lifecycle.promote(c, v1, tmp_path / "m1", kube=fake_kube)
    lifecycle.promote(c, v2, tmp_path / "m2", kube=fake_kube)
    assert str(tracking.get_alias_version(uri, model, tracking.CHAMPION).version) == v2
    live = next(iter(fake_kube.custom.objects.values()))
    assert live["metadata"]["labels"]["omni-platform/model-version"] == v2
    assert (tmp_path / "m2" / "inferenceservice.yaml").exists()

    def aliases():
        return tuple(
            str(tracking.get_alias_version(uri, model, a).version)
            for a in (tracking.CHAMPION, tracking.PREVIOUS_CHAMPION)
        )

    # A rollback whose apply the API server refuses, or whose revision never comes up, moves no
    # alias: the registry still names what the cluster serves.
    def refuse(*_a, **_k):
        raise ApiException(status=403, reason="Forbidden")

    with monkeypatch.context() as m:
        m.setattr(fake_kube.custom, "patch_namespaced_custom_object", refuse)
        with pytest.raises(KubeError, match="HTTP 403 Forbidden"):
            lifecycle.rollback(c, tmp_path / "rb0", kube=fake_kube)
    assert aliases() == (v2, v1)
    fake_kube.custom.controller = lambda obj: obj.update(status={"modelStatus": {"transitionStatus": "InvalidSpec"}})
    with pytest.raises(endpoint.RolloutFailed):
        lifecycle.rollback(c, tmp_path / "rb1", kube=fake_kube)
    assert aliases() == (v2, v1)

    fake_kube.custom.controller = FakeKServe()
    fake_kube.custom.calls.clear()
    version, isvc = lifecycle.rollback(c, tmp_path / "rb", kube=fake_kube)
    assert version == v1 and str(tracking.get_alias_version(uri, model, tracking.CHAMPION).version) == v1
    patches = [body for verb, _, body in fake_kube.custom.calls if verb == "patch"]
    assert len(patches) == 1 and patches[0]["spec"]["predictor"]["canaryTrafficPercent"] is None  # full at once
    live = next(iter(fake_kube.custom.objects.values()))
    assert live["metadata"]["labels"]["omni-platform/model-version"] == v1
    assert live["spec"]["predictor"]["model"]["storageUri"] == isvc["spec"]["predictor"]["model"]["storageUri"]
    assert tracking.get_alias_version(uri, model, tracking.PREVIOUS_CHAMPION) is None
    with pytest.raises(LookupError, match="previous-champion"):  # nothing left to roll back to
        lifecycle.rollback(c, tmp_path / "rb2", kube=fake_kube)
