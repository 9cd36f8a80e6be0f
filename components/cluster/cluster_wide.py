"""Cluster-wide settings the platform needs from KServe and Knative, generated from conf/cluster and
applied by `infra/install.sh` (cluster-admin; the chart itself stays namespace-scoped):

    python -m components.cluster.cluster_wide storage-container [overrides]   # ClusterStorageContainer YAML
    python -m components.cluster.cluster_wide knative-domain [overrides]      # merge patch of config-domain
    python -m components.cluster.cluster_wide kserve-ingress [overrides] < ingress.json   # patch of KServe's ingress
    python -m components.cluster.cluster_wide knative-timeouts [overrides]    # merge patch of config-defaults
    python -m components.cluster.cluster_wide activator-grace [overrides]     # merge patch of the activator
    python -m components.cluster.cluster_wide kourier-timeouts [overrides]    # merge patch of config-kourier

- KServe injects its storage initializer into every predictor pod with no securityContext, which an
  enforced Pod Security "restricted" refuses. KServe merges the ClusterStorageContainer that serves
  a URI into that init container, so its `default` one (s3://, gs://, https://...) is re-applied
  with a restricted securityContext.
- Knative routes `<ksvc>.<namespace>.<domain>` through Kourier only for a configured domain, and
  KServe's own top-level host needs Istio: `disableIstioVirtualHost` makes status.url the
  predictor's Knative host, which Kourier routes.
- A `/v1/realtime` session is one WebSocket, which every proxy sees as one long HTTP request; each
  must keep it open for the InferenceService's `timeout` (`endpoint.request_timeout_s`, from
  serving.realtime.max_session_s): Knative's ceiling on revision timeouts and the defaults it would
  otherwise put on the revision, the activator's grace period, and Envoy's stream idle timeout in Kourier.
`serving_pod` assembles the predictor pod the way KServe and Knative will, for offline checks.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Mapping
from typing import Any

import yaml

from components.cluster.endpoint import request_timeout_s
from components.cluster.render import INFRA_DIR
from components.config import OmniConfig

STORAGE_INITIALIZER = "storage-initializer"
KNATIVE_MAX_REVISION_TIMEOUT_S = 600  # config-defaults max-revision-timeout-seconds as Knative ships it
MODEL_VOLUME = "kserve-provision-location"  # KServe's emptyDir for /mnt/models
# The URIs KServe's own `default` ClusterStorageContainer serves (config/storagecontainers/default.yaml).
KSERVE_DEFAULT_URIS = [{"prefix": "gs://"}, {"prefix": "s3://"}, {"prefix": "hdfs://"}, {"prefix": "webhdfs://"},
                       {"regex": "https://(.+?).blob.core.windows.net/(.+)"},
                       {"regex": "https://(.+?).file.core.windows.net/(.+)"}, {"regex": "https?://(.+)/(.+)"}]


def kserve_version() -> str:
    """The KServe release infra/install.sh installs (its KSERVE_VERSION line)."""
    return re.search(r"^KSERVE_VERSION=(\S+)", (INFRA_DIR / "install.sh").read_text(), re.M).group(1)


def restricted_security_context(uid: int) -> dict[str, Any]:
    """A container securityContext that passes Pod Security "restricted" on its own (no pod-level help:
    Knative drops the pod securityContext unless kubernetes.podspec-securitycontext is on)."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "runAsUser": uid, "runAsGroup": uid, "seccompProfile": {"type": "RuntimeDefault"}}


def storage_container(uid: int = 10001) -> dict[str, Any]:
    """KServe's `default` ClusterStorageContainer, as its release ships it, plus a restricted securityContext."""
    container = {"name": STORAGE_INITIALIZER, "image": f"kserve/storage-initializer:{kserve_version()}",
                 "resources": {"requests": {"memory": "100Mi", "cpu": "100m"}, "limits": {"memory": "1Gi", "cpu": "1"}},
                 "securityContext": restricted_security_context(uid),
                 # boto3's default upload/download checksums break on several S3-compatible stores.
                 "env": [{"name": "AWS_REQUEST_CHECKSUM_CALCULATION", "value": "when_required"},
                         {"name": "AWS_RESPONSE_CHECKSUM_VALIDATION", "value": "when_required"}]}
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ClusterStorageContainer",
            "metadata": {"name": "default", "labels": {"app.kubernetes.io/part-of": "omni-platform"}},
            "spec": {"container": container, "supportedUriFormats": KSERVE_DEFAULT_URIS,
                     "workloadType": "initContainer"}}


def knative_domain_patch(cfg: OmniConfig) -> dict[str, Any]:
    return {"data": {cfg.cluster.ingress.domain: ""}}


def kserve_ingress_patch(current: str, cfg: OmniConfig) -> dict[str, Any]:
    """A merge patch for inferenceservice-config: its `ingress` JSON as installed, with the keys that
    make status.url a host Kourier routes."""
    ingress = json.loads(current or "{}")
    ingress.update({"disableIstioVirtualHost": True, "ingressDomain": cfg.cluster.ingress.domain,
                    "urlScheme": cfg.cluster.ingress.scheme})
    return {"data": {"ingress": json.dumps(ingress, indent=2)}}


def knative_timeouts_patch(cfg: OmniConfig) -> dict[str, Any]:
    """A merge patch for Knative's config-defaults. `max-revision-timeout-seconds` is the ceiling its
    webhook holds every revision's timeoutSeconds to (shipped: 600 s, under a realtime session).
    KServe v0.20.0 sets the revision's timeoutSeconds and responseStartTimeoutSeconds from the
    InferenceService's `timeout` and leaves idleTimeoutSeconds to Knative, which puts the cluster's
    `revision-idle-timeout-seconds` on it when that is non-zero and under its timeout; queue-proxy
    would then cut a quiet WebSocket. 0 (Knative's shipped value) puts none on."""
    ceiling = max(request_timeout_s(cfg), KNATIVE_MAX_REVISION_TIMEOUT_S)
    return {"data": {"max-revision-timeout-seconds": str(ceiling), "revision-idle-timeout-seconds": "0"}}


def activator_grace_patch(cfg: OmniConfig) -> dict[str, Any]:
    """The activator proxies requests while a revision has too few free slots (and from zero): on a
    restart it drains them for terminationGracePeriodSeconds, which Knative says to raise with
    max-revision-timeout-seconds, so a session through it is not cut by a rollout of Knative itself."""
    ceiling = knative_timeouts_patch(cfg)["data"]["max-revision-timeout-seconds"]
    return {"spec": {"template": {"spec": {"terminationGracePeriodSeconds": int(ceiling)}}}}


def kourier_timeouts_patch(cfg: OmniConfig) -> dict[str, Any]:
    """A merge patch for config-kourier: Envoy's stream idle timeout (shipped 300 s) ends a WebSocket
    on which neither side sent a frame for that long, e.g. a user thinking between turns."""
    return {"data": {"stream-idle-timeout": f"{request_timeout_s(cfg)}s"}}


def predictor_host(cfg: OmniConfig) -> str:
    """The host of status.url with disableIstioVirtualHost: the predictor's Knative Service route."""
    return f"{cfg.serving.model_name}-predictor.{cfg.cluster.namespace}.{cfg.cluster.ingress.domain}"


def _merge(base: Any, over: Any) -> Any:
    """Maps merged key by key, anything else replaced (enough for the container fields used here)."""
    if isinstance(base, Mapping) and isinstance(over, Mapping):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return copy.deepcopy(over)


def serving_pod(runtime: Mapping[str, Any], isvc: Mapping[str, Any],
                storage: Mapping[str, Any] | None) -> dict[str, Any]:
    """The predictor pod KServe (Serverless) and Knative create for `isvc` on `runtime`: the runtime's
    container with the ISVC's resources, Knative's queue-proxy under secure-pod-defaults, and KServe's
    storage initializer (its built-in container merged with `storage`, the ClusterStorageContainer
    serving the URI, if any). The pod securityContext is empty: Knative masks it by default."""
    predictor = isvc["spec"]["predictor"]
    user = _merge(copy.deepcopy(runtime["spec"]["containers"][0]), {"resources": predictor["model"]["resources"]})
    user.setdefault("volumeMounts", []).append({"name": MODEL_VOLUME, "mountPath": "/mnt/models", "readOnly": True})
    init = {"name": STORAGE_INITIALIZER, "image": f"kserve/storage-initializer:{kserve_version()}",
            "args": [predictor["model"]["storageUri"], "/mnt/models"],
            "volumeMounts": [{"name": MODEL_VOLUME, "mountPath": "/mnt/models"}]}
    if storage is not None:
        init = _merge(init, {k: v for k, v in storage["spec"]["container"].items() if k != "name"})
    queue = {"name": "queue-proxy", "image": "knative/queue", "securityContext": {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}}
    volumes = [*copy.deepcopy(runtime["spec"].get("volumes") or []), {"name": MODEL_VOLUME, "emptyDir": {}}]
    return {"serviceAccountName": predictor.get("serviceAccountName"), "initContainers": [init],
            "containers": [user, queue], "volumes": volumes,
            **{k: predictor[k] for k in ("nodeSelector", "tolerations") if k in predictor}}


PATCHES = {"knative-domain": knative_domain_patch, "knative-timeouts": knative_timeouts_patch,
           "activator-grace": activator_grace_patch, "kourier-timeouts": kourier_timeouts_patch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.cluster.cluster_wide", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["storage-container", "kserve-ingress", *PATCHES])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. cluster.ingress.domain=ml.example.com")
    args = parser.parse_args(argv)
    from components.config import load_config

    cfg = load_config(args.overrides)
    if args.what == "storage-container":
        print(yaml.safe_dump(storage_container(), sort_keys=False), end="")
    elif args.what in PATCHES:
        print(json.dumps(PATCHES[args.what](cfg)))
    else:
        print(json.dumps(kserve_ingress_patch(sys.stdin.read(), cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
