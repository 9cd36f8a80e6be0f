"""InferenceService manifests, validated offline against the upstream KServe CRD schema."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from serving.manifests import inference_service, validate_custom_resource, write_manifest

CRD_DIR = Path(__file__).resolve().parents[2] / "infra" / "crds"
STORAGE = "s3://models/omni-tiny/3/model"


def test_minimal_inference_service_is_valid() -> None:
    isvc = inference_service("omni-tiny", "omni", STORAGE)
    validate_custom_resource(isvc, CRD_DIR)
    model = isvc["spec"]["predictor"]["model"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert model["modelFormat"] == {"name": "omni"}
    assert model["runtime"] == "omni-predictor" and model["storageUri"] == STORAGE
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]


def test_full_inference_service_is_valid() -> None:
    isvc = inference_service(
        "omni-7b",
        "omni",
        STORAGE,
        runtime="omni-triton",
        cpu="4",
        memory="32Gi",
        gpu=1,
        canary_traffic_percent=10,
        service_account="omni-storage",
        annotations={"serving.kserve.io/deploymentMode": "RawDeployment"},
        labels={"app": "omni"},
        min_replicas=1,
        max_replicas=2,
    )
    validate_custom_resource(isvc, CRD_DIR)
    predictor = isvc["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["serviceAccountName"] == "omni-storage"
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_unknown_and_mistyped_fields_fail() -> None:
    good = inference_service("omni-tiny", "omni", STORAGE)

    unknown = copy.deepcopy(good)
    unknown["spec"]["predictor"]["model"]["storageURI"] = STORAGE
    with pytest.raises(ValueError, match=r"spec\.predictor\.model\.storageURI: unknown field"):
        validate_custom_resource(unknown, CRD_DIR)

    typo = copy.deepcopy(good)
    typo["spec"]["predictor"]["canaryTraficPercent"] = 10
    typo["metadata"]["lables"] = {}
    with pytest.raises(ValueError) as info:
        validate_custom_resource(typo, CRD_DIR)
    assert "spec.predictor.canaryTraficPercent: unknown field" in str(info.value)
    assert "metadata.lables: unknown field" in str(info.value)

    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["predictor"]["canaryTrafficPercent"] = "ten"
    with pytest.raises(ValueError, match=r"spec\.predictor\.canaryTrafficPercent"):
        validate_custom_resource(wrong_type, CRD_DIR)

    no_format = copy.deepcopy(good)
    del no_format["spec"]["predictor"]["model"]["modelFormat"]["name"]
    with pytest.raises(ValueError, match=r"spec\.predictor\.model\.modelFormat: 'name' is a required"):
        validate_custom_resource(no_format, CRD_DIR)


def test_preserved_and_open_maps_still_accept_anything() -> None:
    isvc = inference_service("omni-tiny", "omni", STORAGE, gpu=2)
    isvc["spec"]["predictor"]["nodeSelector"] = {"any/label": "x"}  # additionalProperties: string
    isvc["status"] = {"whatever": {"the": "controller writes"}}  # x-kubernetes-preserve-unknown-fields
    validate_custom_resource(isvc, CRD_DIR)


def test_unknown_kind_or_version_is_reported() -> None:
    isvc = inference_service("omni-tiny", "omni", STORAGE)
    with pytest.raises(ValueError, match="no CRD"):
        validate_custom_resource({**isvc, "kind": "InferenceServise"}, CRD_DIR)
    with pytest.raises(ValueError, match="v1beta1"):
        validate_custom_resource({**isvc, "apiVersion": "serving.kserve.io/v1"}, CRD_DIR)


def test_builder_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="DNS-1035"):
        inference_service("Omni_Tiny", "omni", STORAGE)
    with pytest.raises(ValueError, match="canary"):
        inference_service("omni", "omni", STORAGE, canary_traffic_percent=120)


def test_write_manifest_round_trips(tmp_path: Path) -> None:
    isvc = inference_service("omni-tiny", "omni", STORAGE, canary_traffic_percent=10)
    path = write_manifest(isvc, tmp_path / "deploy" / "isvc.yaml")
    assert yaml.safe_load(path.read_text()) == isvc
    both = write_manifest([isvc, isvc], tmp_path / "two.yaml")
    assert list(yaml.safe_load_all(both.read_text())) == [isvc, isvc]
