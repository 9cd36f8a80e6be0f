"""The champion's InferenceService: one builder for promote, rollback, `omni cluster render` and
(through a test) the chart, and the rollout against the API server.

Rollout (`cluster.target=kubernetes`): apply the new storage URI with `canaryTrafficPercent`
(KServe sends that share to the new revision, the rest to the last ready one), wait until it is
Ready and has stayed Ready for `canary_hold_s`, then drop the field so all traffic moves. A
first deployment has no previous revision to share with and goes straight to full traffic.
Rollback applies the previous champion at full traffic at once: that is what a rollback is for.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from components import kube as k8s
from components.config import OmniConfig
from serving.manifests import inference_service

MLFLOW_ARTIFACTS = "mlflow-artifacts:/"
# KServe's model status while a revision cannot come up: waiting longer will not help.
_HOPELESS = {"BlockedByFailedLoad", "InvalidSpec"}


class RolloutFailed(RuntimeError):
    """The InferenceService did not become Ready; the message carries KServe's reason."""


class OwnedByHelm(RolloutFailed):
    """The live champion is managed by the chart (endpoint.enabled): a `helm upgrade` would put its
    storageUri back over anything promote or rollback applied, so they leave it alone."""


def _check_owner(live: dict[str, Any]) -> None:
    labels = (live.get("metadata") or {}).get("labels") or {}
    if labels.get("app.kubernetes.io/managed-by") == "Helm":
        meta = live["metadata"]
        raise OwnedByHelm(
            f"InferenceService {meta.get('namespace')}/{meta['name']} is managed by Helm (chart value "
            "endpoint.enabled=true): the next `helm upgrade` would restore its storageUri. Either set "
            "endpoint.storageUri in your values and `helm upgrade` (GitOps owns the champion), or set "
            "endpoint.enabled=false, `helm upgrade`, and let promote/rollback own it")


def storage_uri(cfg: OmniConfig, uri: str) -> str:
    """A registry download URI as KServe's storage initializer can fetch it: an MLflow server that
    proxies artifacts hands out `mlflow-artifacts:/...`, which lives under its artifacts root."""
    root = cfg.cluster.endpoint.mlflow_artifacts_root
    if uri.startswith(MLFLOW_ARTIFACTS):
        if not root:
            raise ValueError(
                f"model URI {uri!r} is an mlflow-artifacts: URI; set cluster.endpoint.mlflow_artifacts_root "
                "to the MLflow server's --artifacts-destination"
            )
        return f"{root.rstrip('/')}/{uri[len(MLFLOW_ARTIFACTS) :].lstrip('/')}"
    return uri


def champion_isvc(
    cfg: OmniConfig, storage: str, version: str | None = None, canary_percent: int | None = None
) -> dict[str, Any]:
    """The champion InferenceService for a model at `storage` (already a fetchable URI)."""
    ep, pool = cfg.cluster.endpoint, cfg.cluster.gpu_pool
    gpu_placement = ep.gpu > 0
    return inference_service(
        name=cfg.serving.model_name,
        namespace=cfg.cluster.namespace,
        storage_uri=storage,
        runtime=ep.runtime,
        cpu=ep.cpu,
        memory=ep.memory,
        gpu=ep.gpu,
        canary_traffic_percent=canary_percent,
        service_account=ep.service_account,
        labels={
            "app.kubernetes.io/part-of": "omni-platform",
            **({"omni-platform/model-version": str(version)} if version is not None else {}),
        },
        min_replicas=ep.min_replicas,
        max_replicas=ep.max_replicas,
        container_concurrency=ep.container_concurrency,
        annotations=isvc_annotations(cfg),
        node_selector=pool.node_selector if gpu_placement else cfg.cluster.cpu_pool.node_selector,
        tolerations=[t.model_dump(exclude_none=True) for t in pool.tolerations] if gpu_placement else None,
    )


def isvc_annotations(cfg: OmniConfig) -> dict[str, str]:
    """Knative settings KServe passes on to the predictor's revisions."""
    return {"serving.knative.dev/progress-deadline": f"{int(cfg.cluster.endpoint.progress_deadline_s)}s"}


def rollout(
    cfg: OmniConfig,
    isvc: dict[str, Any],
    kube: k8s.Kube,
    *,
    canary: bool = True,
    emit: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    poll_s: float = 10.0,
) -> dict[str, Any]:
    """Apply `isvc` (built without a canary percent): canary first when there is a live one to
    share traffic with and `canary` is set, then full traffic. Returns the final live object."""
    emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
    ep = cfg.cluster.endpoint
    name = f"{isvc['metadata']['namespace']}/{isvc['metadata']['name']}"
    existing = k8s.get(kube, isvc)
    if existing is not None:
        _check_owner(existing)
    if canary and existing is not None:
        staged = _with_canary(isvc, ep.canary_percent)
        k8s.apply(kube, staged)
        emit(f"InferenceService {name}: canary at {ep.canary_percent}% of traffic")
        wait_ready(kube, staged, ep.ready_timeout_s, poll_s, sleep)
        if ep.canary_hold_s:
            emit(f"holding the canary for {ep.canary_hold_s:.0f}s")
            sleep(ep.canary_hold_s)
            wait_ready(kube, staged, ep.ready_timeout_s, poll_s, sleep)
    # On a live object, a null canaryTrafficPercent in the merge patch removes the field.
    full = _with_canary(isvc, None) if existing is not None else isvc
    k8s.apply(kube, full)
    emit(f"InferenceService {name}: all traffic to {isvc['spec']['predictor']['model']['storageUri']}")
    return wait_ready(kube, full, ep.ready_timeout_s, poll_s, sleep)


def _with_canary(isvc: dict[str, Any], percent: int | None) -> dict[str, Any]:
    """A copy with canaryTrafficPercent set (None: delete it, in a merge patch)."""
    predictor = {**isvc["spec"]["predictor"], "canaryTrafficPercent": percent}
    return {**isvc, "spec": {**isvc["spec"], "predictor": predictor}}


def wait_ready(
    kube: k8s.Kube, isvc: dict[str, Any], timeout_s: float, poll_s: float, sleep: Callable[[float], None] = time.sleep
) -> dict[str, Any]:
    """Until the InferenceService has reconciled this generation and is Ready."""
    waited = 0.0
    while True:
        live = k8s.get(kube, isvc) or {}
        status = live.get("status") or {}
        ready = k8s.condition(live, "Ready")
        current = status.get("observedGeneration", 0) >= (live.get("metadata") or {}).get("generation", 0)
        if current and ready and ready.get("status") == "True":
            return live
        transition = (status.get("modelStatus") or {}).get("transitionStatus")
        if transition in _HOPELESS:
            raise RolloutFailed(f"InferenceService {isvc['metadata']['name']}: {transition}: {_why(live)}")
        if waited >= timeout_s:
            raise RolloutFailed(
                f"InferenceService {isvc['metadata']['name']} not Ready after {timeout_s:.0f}s "
                f"(cluster.endpoint.ready_timeout_s): {_why(live)}"
            )
        sleep(poll_s)
        waited += poll_s


def _why(live: dict[str, Any]) -> str:
    bad = [
        f"{c.get('type')}={c.get('status')} {c.get('reason') or ''} {c.get('message') or ''}".strip()
        for c in (live.get("status") or {}).get("conditions") or []
        if c.get("status") != "True"
    ]
    return "; ".join(bad) or "no status yet"
