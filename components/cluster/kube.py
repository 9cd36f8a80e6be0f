"""The Kubernetes API, as little of it as the platform needs: apply (create or merge-patch) a custom
resource, read it back, follow a pod's log.

Every custom resource is validated against its CRD schema (`serving.manifests.validate_custom_resource`)
before it is sent, so a typo fails here with the field's path instead of being pruned silently by
the API server. The API objects are passed in (`Kube`), so tests drive the same code with a fake.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from serving.manifests import validate_custom_resource

# kind -> plural, for the custom resources the platform creates.
PLURALS = {"InferenceService": "inferenceservices", "TrainJob": "trainjobs"}


class KubeError(RuntimeError):
    """The API server refused a request, or could not be reached."""


@dataclass
class Kube:
    """The two client APIs the platform uses: `kubernetes.client.CustomObjectsApi` and `CoreV1Api`."""

    custom: Any
    core: Any


def connect() -> Kube:
    """In a pod: the service account's in-cluster config; elsewhere: the current kubeconfig context."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            raise KubeError(
                "no Kubernetes API to talk to: not running in a pod and no usable kubeconfig "
                f"({err}). Set KUBECONFIG or run inside the cluster; to write manifests only, set "
                "cluster.target=local") from None
    return Kube(custom=client.CustomObjectsApi(), core=client.CoreV1Api())


def _coords(obj: Mapping[str, Any]) -> tuple[str, str, str, str, str]:
    group, version = obj["apiVersion"].split("/", 1)
    kind = obj["kind"]
    if kind not in PLURALS:
        raise ValueError(f"don't know the plural of kind {kind!r}; add it to components.cluster.kube.PLURALS")
    meta = obj["metadata"]
    return group, version, meta["namespace"], PLURALS[kind], meta["name"]


def _status(err: Exception) -> int | None:
    return getattr(err, "status", None)


def get(kube: Kube, obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The live object with `obj`'s kind, namespace and name; None when it does not exist."""
    group, version, namespace, plural, name = _coords(obj)
    try:
        return kube.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
    except Exception as err:  # the client raises ApiException; fakes raise anything with .status
        if _status(err) == 404:
            return None
        raise KubeError(f"reading {obj['kind']} {namespace}/{name}: {_reason(err)}") from err


def apply(kube: Kube, obj: Mapping[str, Any]) -> dict[str, Any]:
    """Create `obj`, or merge-patch the live one with it (a `None` value deletes that field).
    Returns what the API server answered."""
    validate_custom_resource(_without_nulls(obj))
    group, version, namespace, plural, name = _coords(obj)
    try:
        if get(kube, obj) is None:
            return kube.custom.create_namespaced_custom_object(group, version, namespace, plural, _without_nulls(obj))
        return kube.custom.patch_namespaced_custom_object(group, version, namespace, plural, name, dict(obj))
    except KubeError:
        raise
    except Exception as err:
        raise KubeError(f"applying {obj['kind']} {namespace}/{name}: {_reason(err)}") from err


def delete(kube: Kube, obj: Mapping[str, Any]) -> None:
    group, version, namespace, plural, name = _coords(obj)
    try:
        kube.custom.delete_namespaced_custom_object(group, version, namespace, plural, name)
    except Exception as err:
        if _status(err) != 404:
            raise KubeError(f"deleting {obj['kind']} {namespace}/{name}: {_reason(err)}") from err


def condition(live: Mapping[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The status condition of type `kind`, if the object has one."""
    for cond in ((live or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def follow_logs(kube: Kube, namespace: str, label_selector: str, container: str,
                emit: Callable[[str], None], stop: threading.Event, poll_seconds: float = 5.0) -> threading.Thread:
    """Stream the log of the first pod matching `label_selector` to `emit`, line by line, in a
    background thread, once the pod has started; ends with the pod's log or when `stop` is set."""

    def run() -> None:
        while not stop.is_set():
            try:
                pods = kube.core.list_namespaced_pod(namespace, label_selector=label_selector).items
                started = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
                if started:
                    name = sorted(p.metadata.name for p in started)[0]
                    stream = kube.core.read_namespaced_pod_log(name, namespace, container=container, follow=True,
                                                               _preload_content=False)
                    for chunk in stream.stream():
                        for line in chunk.decode(errors="replace").splitlines():
                            emit(f"[{name}] {line}")
                        if stop.is_set():
                            break
                    return
            except Exception as err:  # logs are best effort: the job's status decides the outcome
                emit(f"(log stream interrupted: {_reason(err)}; retrying)")
            stop.wait(poll_seconds)

    thread = threading.Thread(target=run, name="omni-log-follower", daemon=True)
    thread.start()
    return thread


def _without_nulls(value: Any) -> Any:
    """Drop `None` values: they mean "delete" in a merge patch but are invalid in a created object."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _reason(err: Exception) -> str:
    status, reason = _status(err), getattr(err, "reason", None)
    body = getattr(err, "body", None)
    detail = f" {body}" if body else ""
    return f"HTTP {status} {reason}{detail}" if status else f"{type(err).__name__}: {err}"
