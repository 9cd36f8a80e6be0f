"""The CI checks of `make check-cluster`, run by pytest too: kubernetes-validate --strict, CRD
jsonschema, yamllint, helm lint, checkov (manifests and Dockerfiles) and hadolint."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from components.cluster import check as checks


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> dict[str, Path]:
    return checks.render_variants(tmp_path_factory.mktemp("cluster"))


def test_default_and_every_ci_values_file_are_rendered(renders) -> None:
    assert set(renders) == {"default", "production", "gitops"}


def test_core_kinds_pass_strict_kubernetes_validation(renders) -> None:
    for out in renders.values():
        checked, errors = checks.kubernetes_validate(out)
        assert checked >= 12 and errors == []


def test_strict_validation_catches_an_unknown_field(renders, tmp_path) -> None:
    docs = list(yaml.safe_load_all((renders["default"] / "10-chart.yaml").read_text()))
    deployment = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(deployment))
    _, errors = checks.kubernetes_validate(tmp_path)
    assert errors and "imagePullPolicyy" in errors[0]


def test_custom_resources_validate_against_the_crds(renders) -> None:
    assert checks.custom_resources(renders["default"]) == 4  # ServingRuntime, TrainingRuntime, ISVC, TrainJob
    assert checks.custom_resources(renders["production"]) == 4  # the pipeline owns the champion
    assert checks.custom_resources(renders["gitops"]) == 5  # + the chart's champion ISVC


def test_yamllint_and_helm_lint_are_clean(renders) -> None:
    for out in renders.values():
        assert checks.yamllint(out) == []
    for values in [None, *checks.VALUES_FILES]:
        assert checks.helm_lint(values) == []


def test_hadolint_is_clean() -> None:
    assert len(checks.DOCKERFILES) == 3
    assert checks.hadolint() == []


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _require_checkov() -> None:
    """CI installs checkov (`make test` runs `make checkov`), so there a missing binary is a failure,
    not a silently skipped check; elsewhere the test is skipped with the command to install it."""
    if checks.checkov_bin() is None:
        why = "checkov not installed: run `make checkov` (make test installs it) or set CHECKOV to its path"
        if _in_ci():
            pytest.fail(f"{why}; CI (CI=true) must run the checkov checks")
        pytest.skip(why)


@pytest.fixture
def needs_checkov() -> None:
    _require_checkov()


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_checkov_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome) -> None:
    monkeypatch.setattr(checks, "checkov_bin", lambda: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="make checkov"):
        _require_checkov()


@pytest.mark.usefixtures("needs_checkov")
def test_checkov_passes_on_the_rendered_manifests(renders) -> None:
    # One scan per render: checkov merges same-named resources across folders of one scan.
    for name, minimum in (("default", 100), ("production", 280), ("gitops", 100)):
        result = checks.checkov([renders[name]], "kubernetes")
        assert result.failures == [] and result.passed > minimum, name
    # The only exceptions are the ones .checkov.yaml lists and justifies.
    assert checks.checkov_config_skips() == ["CKV_K8S_43"]


@pytest.mark.usefixtures("needs_checkov")
def test_checkov_passes_on_the_dockerfiles() -> None:
    result = checks.checkov(checks.DOCKERFILES, "dockerfile")
    assert result.failures == [] and result.passed > 300
