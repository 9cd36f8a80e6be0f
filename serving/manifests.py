"""KServe manifests as plain dicts, and offline validation against the CRD schemas.

There is no cluster to ask, so a custom resource is checked with `jsonschema` against the
`openAPIV3Schema` of its CRD. CRD schemas leave unknown fields unchecked (the API server prunes
them instead), which would let a typo such as `canaryTraficPercent` slip through; validation
therefore closes every object schema that does not explicitly allow extra fields.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ISVC_API_VERSION = "serving.kserve.io/v1beta1"
GPU_RESOURCE = "nvidia.com/gpu"
# The upstream CRDs, shipped as package data so validation works from an installed wheel/image too.
DEFAULT_CRD_DIR = Path(__file__).resolve().parent / "crds"

# KServe derives Knative/Service names from the InferenceService name: a DNS-1035 label.
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# CRDs declare metadata as a bare object (the API server validates it); check the common fields.
_OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": _DNS1123.pattern, "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "pattern": _DNS1123.pattern, "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    "additionalProperties": False,
}


def inference_service(name: str, namespace: str, storage_uri: str, runtime: str = "omni-predictor", *,
                      cpu: str = "1", memory: str = "4Gi", cpu_limit: str | None = None,
                      memory_limit: str | None = None, gpu: int = 0, canary_traffic_percent: int | None = None,
                      service_account: str | None = None, annotations: Mapping[str, str] | None = None,
                      labels: Mapping[str, str] | None = None, min_replicas: int | None = None,
                      max_replicas: int | None = None, node_selector: Mapping[str, str] | None = None,
                      tolerations: Sequence[Mapping[str, Any]] | None = None,
                      container_concurrency: int | None = None, timeout_s: int | None = None) -> dict[str, Any]:
    """A `serving.kserve.io/v1beta1` InferenceService serving `storage_uri` with our runtime.

    `canary_traffic_percent` routes that share of traffic to this revision and the rest to the
    last ready one (KServe's canary rollout); None means all traffic. `timeout_s` is how long one
    request may stay open (KServe's `timeout`, Knative's revision timeoutSeconds).
    """
    _check_isvc_args(name, namespace, gpu, canary_traffic_percent)
    requests: dict[str, Any] = {"cpu": cpu, "memory": memory}
    limits: dict[str, Any] = {"cpu": cpu_limit or cpu, "memory": memory_limit or memory}
    if gpu:
        # Extended resources must be requested and limited alike.
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = gpu
    model = {"modelFormat": {"name": "omni"}, "runtime": runtime, "storageUri": storage_uri,
             "resources": {"requests": requests, "limits": limits}}
    # Knative needs its kubernetes.podspec-nodeselector/-tolerations features on for the last two (docs/deploy.md).
    optional = {"canaryTrafficPercent": canary_traffic_percent, "serviceAccountName": service_account or None,
                "minReplicas": min_replicas, "maxReplicas": max_replicas,
                "nodeSelector": dict(node_selector) if node_selector else None,
                "tolerations": [dict(t) for t in tolerations] if tolerations else None,
                "containerConcurrency": container_concurrency, "timeout": timeout_s}
    predictor = {"model": model, **{k: v for k, v in optional.items() if v is not None}}
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = dict(labels)
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": ISVC_API_VERSION, "kind": "InferenceService", "metadata": metadata,
            "spec": {"predictor": predictor}}


def _check_isvc_args(name: str, namespace: str, gpu: int, canary_traffic_percent: int | None) -> None:
    if not _DNS1035.match(name) or len(name) > 63:
        raise ValueError(f"InferenceService name {name!r} must be a DNS-1035 label")
    if not _DNS1123.match(namespace) or len(namespace) > 63:
        raise ValueError(f"namespace {namespace!r} must be a DNS-1123 label")
    if gpu < 0:
        raise ValueError(f"gpu must be >= 0, got {gpu}")
    if canary_traffic_percent is not None and not 0 <= canary_traffic_percent <= 100:
        raise ValueError(f"canary_traffic_percent must be in 0..100, got {canary_traffic_percent}")


def validate_custom_resource(obj: Mapping[str, Any], crd_dir: Path | None = None) -> None:
    """Validate a custom resource against its CRD (found under `crd_dir` by group, version and
    kind). Raises ValueError listing every problem as `path: message`; unknown fields fail."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or "/" not in api_version or not isinstance(kind, str):
        raise ValueError("custom resource needs apiVersion: <group>/<version> and kind")
    group, version = api_version.split("/", 1)
    crd_dir = Path(crd_dir or DEFAULT_CRD_DIR).resolve()
    validator = _validator(crd_dir, group, version, kind)

    problems = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        path = _format_path(error.absolute_path)
        if error.validator == "additionalProperties" and error.validator_value is False:
            known = set(error.schema.get("properties", {}))
            for field in sorted(set(error.instance) - known):
                problems.append(f"{_join(path, field)}: unknown field")
        else:
            problems.append(f"{path or '<root>'}: {error.message}")
    if problems:
        raise ValueError(f"{kind} {api_version} is invalid:\n  " + "\n  ".join(problems))


def write_manifest(obj: Mapping[str, Any] | Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write one object, or several as a multi-document YAML stream, keeping key order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = [obj] if isinstance(obj, Mapping) else list(obj)
    path.write_text(yaml.safe_dump_all([_plain(d) for d in docs], sort_keys=False, default_flow_style=False))
    return path


def _plain(value: Any) -> Any:
    """Mappings/sequences as dict/list so safe_dump accepts them."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@functools.lru_cache(maxsize=16)
def _validator(crd_dir: Path, group: str, version: str, kind: str) -> jsonschema.Draft7Validator:
    for crd in _crds(crd_dir):
        spec = crd.get("spec", {})
        if spec.get("group") != group or spec.get("names", {}).get("kind") != kind:
            continue
        for v in spec.get("versions", []):
            if v.get("name") == version:
                schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
                _close_objects(schema)
                schema.setdefault("properties", {})["metadata"] = _OBJECT_META
                return jsonschema.Draft7Validator(schema)
        served = [v.get("name") for v in spec.get("versions", [])]
        raise ValueError(f"CRD for {kind}.{group} has versions {served}, not {version!r}")
    raise ValueError(f"no CRD for {kind} in group {group} under {crd_dir}")


@functools.lru_cache(maxsize=4)
def _crds(crd_dir: Path) -> tuple[dict[str, Any], ...]:
    if not crd_dir.is_dir():
        raise ValueError(f"CRD directory {crd_dir} does not exist: reinstall the package (the CRDs are package data "
                         "of `serving`, serving/crds) or pass crd_dir")
    # libyaml when available: the InferenceService CRD alone is ~2 MB of YAML.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    found = []
    for file in sorted([*crd_dir.rglob("*.yaml"), *crd_dir.rglob("*.yml")]):
        with file.open() as f:
            found.extend(
                d
                for d in yaml.load_all(f, Loader=loader)
                if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"
            )
    return tuple(found)


def _close_objects(schema: Any) -> None:
    """Add `additionalProperties: false` to every object schema with `properties`, unless it
    already says what extra fields may be or preserves unknown fields.

    Only the structural tree (properties, items, additionalProperties) is walked: a structural
    CRD schema keeps field definitions there, never inside anyOf/allOf.
    """
    if not isinstance(schema, dict):
        return
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    for child in schema.get("properties", {}).values():
        _close_objects(child)
    _close_objects(schema.get("items"))
    _close_objects(schema.get("additionalProperties"))


def _format_path(parts: Sequence[Any]) -> str:
    out = ""
    for part in parts:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, str(part))
    return out


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field
