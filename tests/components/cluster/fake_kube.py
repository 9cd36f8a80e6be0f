"""An in-process stand-in for the two Kubernetes client APIs the platform calls
(`CustomObjectsApi`, `CoreV1Api`), at the client-object level.

It keeps objects in a dict, answers with the client's own `ApiException` (404 on a missing
object, 409 on a duplicate create), applies merge patches the way the API server does (a null
deletes the field; `metadata.generation` grows when the spec changes) and records every call.
Status is written by a `controller` callback, run on each read, that plays the part of the
KServe or Trainer controller. No real API server is involved anywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from kubernetes.client.exceptions import ApiException

Key = tuple[str, str, str, str, str]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeCustomObjects:
    def __init__(self, controller: Callable[[dict[str, Any]], None] | None = None):
        self.objects: dict[Key, dict[str, Any]] = {}
        self.calls: list[tuple[str, Key, Any]] = []
        self.controller = controller

    def _key(self, group, version, namespace, plural, name) -> Key:
        return (group, version, namespace, plural, name)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        key = self._key(group, version, namespace, plural, name)
        self.calls.append(("get", key, None))
        if key not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        if self.controller:
            self.controller(self.objects[key])
        return copy.deepcopy(self.objects[key])

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        key = self._key(group, version, namespace, plural, body["metadata"]["name"])
        self.calls.append(("create", key, copy.deepcopy(body)))
        if key in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        obj = copy.deepcopy(body)
        obj["metadata"]["generation"] = 1
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        key = self._key(group, version, namespace, plural, name)
        self.calls.append(("patch", key, copy.deepcopy(body)))
        if key not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        old = self.objects[key]
        new = merge_patch(old, {k: v for k, v in body.items() if k != "status"})
        if new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        self.objects[key] = new
        return copy.deepcopy(new)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        key = self._key(group, version, namespace, plural, name)
        self.calls.append(("delete", key, None))
        if self.objects.pop(key, None) is None:
            raise ApiException(status=404, reason="Not Found")
        return {}

    def verbs(self) -> list[str]:
        return [verb for verb, _, _ in self.calls if verb != "get"]


class _LogStream:
    def __init__(self, lines: list[str]):
        self._lines = lines

    def stream(self):
        for line in self._lines:
            yield (line + "\n").encode()


class FakeCore:
    """Pods and their logs: `pods[name] = phase`, `logs[name] = [lines]`, and for readiness checks
    `health[name] = (ready, container restarts)` (a pod with no entry is Ready with no restarts),
    `ips[name] = pod IP`."""

    def __init__(self):
        self.pods: dict[str, str] = {}
        self.logs: dict[str, list[str]] = {}
        self.health: dict[str, tuple[bool, int]] = {}
        self.ips: dict[str, str] = {}
        self.selectors: list[str] = []

    def list_namespaced_pod(self, namespace, label_selector=""):
        self.selectors.append(label_selector)
        items = []
        for name, phase in self.pods.items():
            ready, restarts = self.health.get(name, (True, 0))
            status = SimpleNamespace(phase=phase, pod_ip=self.ips.get(name),
                                     conditions=[SimpleNamespace(type="Ready", status=str(ready))],
                                     container_statuses=[SimpleNamespace(restart_count=restarts)])
            items.append(SimpleNamespace(metadata=SimpleNamespace(name=name), status=status))
        return SimpleNamespace(items=items)

    def read_namespaced_pod_log(self, name, namespace, container=None, follow=False, _preload_content=True):
        return _LogStream(self.logs.get(name, []))


class FakeKServe:
    """Plays KServe's Serverless reconciler on an InferenceService read: a spec change makes a new
    Knative revision (ready at once unless `ready` is False); traffic follows canaryTrafficPercent
    between the latest revision and the last rolled-out one, as KServe routes it. Its
    observedGeneration is Knative's own counter, never the InferenceService's generation."""

    def __init__(self, ready: bool = True):
        self.ready = ready
        self.revisions: list[str] = []
        self._seen: dict[str, str] = {}

    def __call__(self, obj: dict[str, Any]) -> None:
        # The revision template is the predictor without its traffic split: only that makes a revision.
        name = obj["metadata"]["name"]
        predictor = obj["spec"]["predictor"]
        template = repr(sorted((k, repr(v)) for k, v in predictor.items() if k != "canaryTrafficPercent"))
        pred = (obj.get("status") or {}).get("components", {}).get("predictor", {})
        if self._seen.get(name) != template:
            self._seen[name] = template
            self.revisions.append(f"{name}-predictor-{len(self.revisions) + 1:05d}")
        latest = self.revisions[-1]
        rolled = pred.get("latestRolledoutRevision")
        canary = obj["spec"]["predictor"].get("canaryTrafficPercent")
        if canary is not None and rolled and rolled != latest:
            traffic = [{"revisionName": latest, "latestRevision": True, "percent": canary},
                       {"revisionName": rolled, "latestRevision": False, "percent": 100 - canary}]
        else:
            traffic = [{"revisionName": latest, "latestRevision": True, "percent": 100}]
            if self.ready:
                pred = {**pred, "previousRolledoutRevision": rolled, "latestRolledoutRevision": latest}
        pred = {**pred, "latestCreatedRevision": latest, "traffic": traffic,
                "latestReadyRevision": latest if self.ready else (rolled or None)}
        obj["status"] = {"observedGeneration": len(self.revisions), "components": {"predictor": pred},
                         "conditions": [{"type": "Ready", "status": "True" if self.ready else "False",
                                         **({} if self.ready else {"reason": "RevisionMissing"})}]}
