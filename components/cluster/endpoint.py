"""The champion's InferenceService: one builder for promote, rollback, `omni cluster render` and
(through a test) the chart, and the rollout against the API server.

Rollout (`cluster.target=kubernetes`): apply the new storage URI with `canaryTrafficPercent`
(KServe sends that share to the new revision, the rest to the last ready one), wait until it is
Ready and has stayed Ready for `canary_hold_s`, then drop the field so all traffic moves. A
first deployment has no previous revision to share with and goes straight to full traffic.
Rollback applies the previous champion at full traffic at once: that is what a rollback is for.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

from components.cluster import canary_metrics
from components.cluster import kube as k8s
from components.config import EndpointConfig, OmniConfig
from serving.manifests import inference_service

MLFLOW_ARTIFACTS = "mlflow-artifacts:/"
# The predictor ends a realtime session at serving.realtime.max_session_s with a close frame naming the
# limit; every proxy in front of it keeps a request open this much longer, so that the close frame,
# not a cut connection, is what a client sees.
SESSION_CLOSE_MARGIN_S = 60
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
        timeout_s=request_timeout_s(cfg),
        node_selector=pool.node_selector if gpu_placement else cfg.cluster.cpu_pool.node_selector,
        tolerations=[t.model_dump(exclude_none=True) for t in pool.tolerations] if gpu_placement else None,
    )


def request_timeout_s(cfg: OmniConfig) -> int:
    """How long one request to the predictor may stay open on the cluster: a `/v1/realtime` session
    (to every proxy a WebSocket is one HTTP request, upgraded) or the longest HTTP request, plus the
    margin. The one source of the InferenceService's `timeout` (Knative's revision timeoutSeconds),
    Knative's cluster-wide timeout ceiling, the activator's grace period and Kourier's stream idle
    timeout (components/cluster/cluster_wide.py)."""
    longest = max(cfg.serving.realtime.max_session_s, cfg.serving.limits.request_timeout_s)
    return math.ceil(longest) + SESSION_CLOSE_MARGIN_S


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
    share traffic with and `canary` is set, then full traffic. Returns the final live object.
    A canary that fails (not Ready in time, or its pods restart or turn unready while it is held)
    gets 0% of traffic again, KServe's own return to the last rolled-out revision, before this raises."""
    emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
    ep = cfg.cluster.endpoint
    name = f"{isvc['metadata']['namespace']}/{isvc['metadata']['name']}"
    existing = k8s.get(kube, isvc)
    if existing is not None:
        _check_owner(existing)
    before = _revisions(existing).get("latestCreatedRevision")
    if existing is not None and _template(existing) == _template(isvc):
        canary, before = False, None  # the live revision already serves this spec: nothing new to canary
    if canary and existing is not None:
        staged = _with_canary(isvc, ep.canary_percent)
        before = _new_revision_after(k8s.apply(kube, staged), existing, before)
        emit(f"InferenceService {name}: canary at {ep.canary_percent}% of traffic")
        try:
            live = wait_ready(kube, staged, ep.ready_timeout_s, poll_s, sleep, before, ep.canary_percent)
            hold_canary(kube, live, ep, poll_s, sleep, emit)
        except RolloutFailed as err:
            k8s.apply(kube, _with_canary(isvc, 0))
            emit(f"InferenceService {name}: canary failed; all traffic back to the last rolled-out revision")
            raise RolloutFailed(f"{err}; the canary was set to 0% (traffic is on the previous revision)") from err
        existing = live  # the canary's revision is the one that now takes all traffic
    # On a live object, a null canaryTrafficPercent in the merge patch removes the field.
    full = _with_canary(isvc, None) if existing is not None else isvc
    before = _new_revision_after(k8s.apply(kube, full), existing, before)
    emit(f"InferenceService {name}: all traffic to {isvc['spec']['predictor']['model']['storageUri']}")
    return wait_ready(kube, full, ep.ready_timeout_s, poll_s, sleep, before, 100)


def _with_canary(isvc: dict[str, Any], percent: int | None) -> dict[str, Any]:
    """A copy with canaryTrafficPercent set (None: delete it, in a merge patch)."""
    predictor = {**isvc["spec"]["predictor"], "canaryTrafficPercent": percent}
    return {**isvc, "spec": {**isvc["spec"], "predictor": predictor}}


def _template(isvc: dict[str, Any]) -> dict[str, Any]:
    """The predictor spec without its traffic split: what makes Knative create a new revision."""
    return {k: v for k, v in isvc["spec"]["predictor"].items() if k != "canaryTrafficPercent"}


def _new_revision_after(answer: dict[str, Any], existing: dict[str, Any] | None, before: str | None) -> str | None:
    """`before` when the apply changed the spec (a new revision must appear), else None: an
    unchanged spec makes no new revision, and the current one is the one to wait for."""
    generation = ((existing or {}).get("metadata") or {}).get("generation")
    return before if (answer.get("metadata") or {}).get("generation") != generation else None


def _revisions(live: dict[str, Any] | None) -> dict[str, Any]:
    """status.components.predictor: the Knative revisions KServe reports (latestCreatedRevision,
    latestReadyRevision, latestRolledoutRevision, previousRolledoutRevision, traffic)."""
    return (((live or {}).get("status") or {}).get("components") or {}).get("predictor") or {}


def _latest_share(predictor: dict[str, Any]) -> int:
    return sum(t.get("percent") or 0 for t in predictor.get("traffic") or [] if t.get("latestRevision"))


def is_rolled_out(live: dict[str, Any], before: str | None, percent: int) -> bool:
    """The applied spec is serving: Ready, a revision created after `before` (the latest created
    revision when we applied, None for any), that revision ready, and it gets `percent` of traffic.
    KServe's status.observedGeneration is Knative's, not the InferenceService's, so generations
    cannot tell a reconciled spec from a stale one; the revisions can."""
    ready = k8s.condition(live, "Ready")
    pred = _revisions(live)
    created = pred.get("latestCreatedRevision")
    return bool(ready and ready.get("status") == "True" and created and created != before
                and pred.get("latestReadyRevision") == created and _latest_share(pred) == percent)


def wait_ready(kube: k8s.Kube, isvc: dict[str, Any], timeout_s: float, poll_s: float,
               sleep: Callable[[float], None] = time.sleep, before: str | None = None,
               percent: int = 100) -> dict[str, Any]:
    """Until the applied spec is rolled out (`is_rolled_out`); KServe's hopeless states fail at once."""
    waited = 0.0
    while True:
        live = k8s.get(kube, isvc) or {}
        if is_rolled_out(live, before, percent):
            return live
        transition = ((live.get("status") or {}).get("modelStatus") or {}).get("transitionStatus")
        if transition in _HOPELESS:
            raise RolloutFailed(f"InferenceService {isvc['metadata']['name']}: {transition}: {_why(live)}")
        if waited >= timeout_s:
            raise RolloutFailed(
                f"InferenceService {isvc['metadata']['name']} not Ready after {timeout_s:.0f}s "
                f"(cluster.endpoint.ready_timeout_s): {_why(live)}"
            )
        sleep(poll_s)
        waited += poll_s


def hold_canary(kube: k8s.Kube, live: dict[str, Any], ep: EndpointConfig, poll_s: float,
                sleep: Callable[[float], None], emit: Callable[[str], None]) -> None:
    """Watch the canary revision for `ep.canary_hold_s`: every poll its pods must all be Ready with
    no container restarted since the hold began (a crash loop or an OOM under real traffic fails
    it); at the end, the requests it served meanwhile (queue-proxy's metrics) must meet the error
    rate and latency limits."""
    if not ep.canary_hold_s:
        return
    revision = _revisions(live)["latestCreatedRevision"]
    namespace = live["metadata"]["namespace"]
    emit(f"holding the canary ({revision}) for {ep.canary_hold_s:.0f}s")
    pods = _pods(kube, namespace, revision)
    start, counts = {name: restarts for name, (_, restarts, _) in pods.items()}, _scrape(pods)
    waited = 0.0
    while waited < ep.canary_hold_s:
        step = min(poll_s, ep.canary_hold_s - waited)
        sleep(step)
        waited += step
        pods = _pods(kube, namespace, revision)
        unready = sorted(p for p, (ready, _, _) in pods.items() if not ready)
        restarted = sorted(p for p, (_, n, _) in pods.items() if n > start.get(p, 0))
        if not pods or unready or restarted:
            raise RolloutFailed(f"canary revision {revision} failed after {waited:.0f}s of {ep.canary_hold_s:.0f}s: "
                                f"pods unready {unready or '-'}, restarted {restarted or '-'}"
                                + ("" if pods else ", no pods left"))
    _judge_traffic(revision, _scrape(pods) - counts, ep, emit)


def _judge_traffic(revision: str, served: canary_metrics.Requests, ep: EndpointConfig,
                   emit: Callable[[str], None]) -> None:
    if served.total < ep.canary_min_requests:
        emit(f"canary {revision} served {served.total:.0f} request(s) in the hold, fewer than "
             f"cluster.endpoint.canary_min_requests={ep.canary_min_requests}: error rate and latency not judged")
        return
    rate, p95 = served.errors / served.total, served.quantile(0.95)
    emit(f"canary {revision}: {served.total:.0f} requests, {rate:.1%} 5xx, p95 {p95:.2f}s")
    if rate > ep.canary_max_error_rate or p95 > ep.canary_max_p95_latency_s:
        raise RolloutFailed(f"canary revision {revision} answered {rate:.1%} of {served.total:.0f} requests with a 5xx "
                            f"(limit {ep.canary_max_error_rate:.1%}) and p95 {p95:.2f}s (limit "
                            f"{ep.canary_max_p95_latency_s:g}s): cluster.endpoint.canary_max_*")


def _scrape(pods: dict[str, tuple[bool, int, str | None]]) -> canary_metrics.Requests:
    """The canary pods' request counters, summed (a pod that cannot be scraped counts as none)."""
    total = canary_metrics.Requests()
    for ip in (ip for _, _, ip in pods.values() if ip):
        total = total + canary_metrics.scrape(ip)
    return total


def _pods(kube: k8s.Kube, namespace: str, revision: str) -> dict[str, tuple[bool, int, str | None]]:
    """pod name -> (Ready, container restarts, pod IP) for the pods of one Knative revision."""
    pods = kube.core.list_namespaced_pod(namespace, label_selector=f"serving.knative.dev/revision={revision}").items
    health = {}
    for pod in pods:
        conds = {c.type: c.status for c in (pod.status.conditions or [])}
        restarts = sum(cs.restart_count for cs in (pod.status.container_statuses or []))
        health[pod.metadata.name] = (conds.get("Ready") == "True", restarts, getattr(pod.status, "pod_ip", None))
    return health


def _why(live: dict[str, Any]) -> str:
    bad = [
        f"{c.get('type')}={c.get('status')} {c.get('reason') or ''} {c.get('message') or ''}".strip()
        for c in (live.get("status") or {}).get("conditions") or []
        if c.get("status") != "True"
    ]
    return "; ".join(bad) or "no status yet"
