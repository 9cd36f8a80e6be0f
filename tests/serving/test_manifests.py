"""InferenceService manifests, validated offline against the upstream KServe CRD schema."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from serving.manifests import DEFAULT_CRD_DIR, inference_service, validate_custom_resource, write_manifest

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "serving" / "crds"
# A reference copy of the upstream CRDs beside the checkout, where there is one.
SHARED_CRDS = REPO / ".." / "shared" / "crds"
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


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_crd_dir_is_inside_the_serving_package() -> None:
    assert DEFAULT_CRD_DIR == CRD_DIR
    assert {"kserve/serving.kserve.io_inferenceservices.yaml", "kubeflow-trainer/trainer.kubeflow.org_trainjobs.yaml"} \
        <= set(_tree(CRD_DIR))


@pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason=f"no reference CRDs at {SHARED_CRDS.resolve()}")
def test_packaged_crds_are_the_reference_copies_byte_for_byte() -> None:
    ours, reference = _tree(CRD_DIR), _tree(SHARED_CRDS)
    assert sorted(ours) == sorted(reference)
    assert [name for name in ours if ours[name] != reference[name]] == []


def test_wheel_ships_the_crds_and_validates_from_an_installed_layout(tmp_path: Path) -> None:
    """`pip install .` puts the package in site-packages, away from the repository: the CRDs must
    travel inside the wheel, and validation must find them there."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("model", "components", "pipelines", "serving"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, cwd=tmp_path, timeout=300)
    (wheel,) = dist.glob("omni_platform-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        packed = {n.removeprefix("serving/crds/"): zf.read(n) for n in zf.namelist() if n.startswith("serving/crds/")}
        zf.extractall(tmp_path / "site")
    assert packed == _tree(CRD_DIR)

    # Import from the unpacked wheel (not the checkout) and validate against its own CRDs.
    code = ("import serving.manifests as m; assert m.__file__.startswith(%r), m.__file__; "
            "m.validate_custom_resource(m.inference_service('omni', 'omni', 's3://b/m')); print(m.DEFAULT_CRD_DIR)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code % str(tmp_path / "site")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "site" / "serving" / "crds")
