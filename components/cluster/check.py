"""Offline checks of everything the platform deploys (`make check-cluster`; tests/components/cluster runs the
same functions):

    python -m components.cluster.check [--out build/cluster]

1. render the platform with the chart's default values and with charts/omni-platform/ci/*-values.yaml;
2. `kubernetes-validate --strict` on every core object (unknown fields fail), against the oldest
   and newest Kubernetes the chart supports;
3. jsonschema against serving/crds for every custom resource (unknown fields fail); every pod
   (the predictor's as KServe and Knative assemble it) against the namespace's Pod Security level;
4. yamllint on the rendered YAML; `helm lint --strict` on the chart;
5. checkov on the rendered manifests and on images/*/Dockerfile (exceptions in .checkov.yaml);
6. hadolint on images/*/Dockerfile (settings in .hadolint.yaml).

checkov lives in its own venv (.cache/checkov-venv, `make checkov`): its pins conflict with torch,
mlflow and kfp. Set CHECKOV to use another binary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from components.cluster.render import (
    CHART_DIR,
    CUSTOM_GROUPS,
    REPO,
    manifest_docs,
    render_all,
    validate_custom_resources,
)

KUBE_VERSIONS = ("1.31.0", "1.37.0")  # the chart's kubeVersion floor, and the newest schemas we have
DOCKERFILES = sorted((REPO / "images").glob("*/Dockerfile"))
VALUES_FILES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
_YAMLLINT = ("{extends: default, rules: {line-length: disable, document-start: disable, "
             "indentation: {indent-sequences: whatever}}}")


@dataclass
class CheckovResult:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    skips: list[str] = field(default_factory=list)


def render_variants(out: Path) -> dict[str, Path]:
    """`default` and one folder per ci/*-values.yaml, each a full `omni cluster render`."""
    from components.config import load_config

    cfg = load_config()
    variants = {"default": None, **{p.name.removesuffix("-values.yaml"): p for p in VALUES_FILES}}
    dirs = {}
    for name, values in variants.items():
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        render_all(cfg, target, values)
        dirs[name] = target
    return dirs


def kubernetes_validate(out_dir: Path, versions: tuple[str, ...] = KUBE_VERSIONS) -> tuple[int, list[str]]:
    """Strict validation of core kinds; returns (objects checked, errors)."""
    import kubernetes_validate as kv

    checked, errors = 0, []
    for doc in manifest_docs(out_dir):
        if doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
            continue
        checked += 1
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except (kv.ValidationError, kv.SchemaNotFoundError, kv.InvalidSchemaError) as err:
                errors.append(f"{doc['kind']}/{doc['metadata'].get('name')} (k8s {version}): {err}")
    return checked, errors


def custom_resources(out_dir: Path) -> int:
    """jsonschema against the CRDs; raises ValueError naming the bad field."""
    return validate_custom_resources(manifest_docs(out_dir))


def pod_security(out_dir: Path) -> tuple[int, list[str]]:
    """Every pod the render would create, checked against the Pod Security level its namespace
    enforces (00-namespace.yaml), including the predictor pod as KServe and Knative assemble it with
    the storage initializer infra/install.sh configures. Returns (pods checked, violations)."""
    from components.cluster import cluster_wide
    from components.cluster import pod_security as pss

    docs = manifest_docs(out_dir)
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    level = namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    pods = [where_pod for d in docs for where_pod in pss.pod_templates(d)]
    runtime = next(d for d in docs if d["kind"] == "ServingRuntime")
    storage = cluster_wide.storage_container()
    pods += [(f"predictor pod of InferenceService/{d['metadata']['name']}",
              cluster_wide.serving_pod(runtime, d, storage)) for d in docs if d["kind"] == "InferenceService"]
    return len(pods), [f"{where}: {v}" for where, pod in pods for v in pss.violations(pod, level)]


def yamllint(out_dir: Path) -> list[str]:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(_YAMLLINT)
    problems = []
    for path in sorted(out_dir.rglob("*.yaml")):
        problems += [
            f"{path.name}:{p.line}: {p.desc} ({p.rule})"
            for p in linter.run(path.read_text(), conf)
            if p.level == "error"
        ]
    return problems


def helm_lint(values_file: Path | None = None) -> list[str]:
    """`helm lint --strict` with the conf-owned values laid over `values_file`."""
    from helm_python import lint

    from components.cluster.render import conf_values, load_values, merge_values
    from components.config import load_config

    values = merge_values(load_values(values_file), conf_values(load_config()))
    report = lint(str(CHART_DIR), values, strict=True, namespace=load_config().cluster.namespace)
    # Severity 1 is informational ("icon is recommended"): not a defect of the manifests.
    return [
        *report.get("errors", []),
        *(f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2),
    ]


def checkov_config_skips() -> list[str]:
    """The checks .checkov.yaml switches off (checkov then leaves them out of its counts)."""
    return list((yaml.safe_load((REPO / ".checkov.yaml").read_text()) or {}).get("skip-check") or [])


def checkov_bin() -> str | None:
    candidates = [
        os.environ.get("CHECKOV"),
        str(REPO / ".cache" / "checkov-venv" / "bin" / "checkov"),
        shutil.which("checkov"),
    ]
    return next((c for c in candidates if c and Path(c).exists()), None)


def checkov(targets: list[Path], framework: str) -> CheckovResult:
    """checkov with .checkov.yaml on files/folders; parses its JSON report."""
    binary = checkov_bin()
    if binary is None:
        raise FileNotFoundError("checkov not found: run `make checkov` (it installs into .cache/checkov-venv)")
    cmd = [binary, "--config-file", str(REPO / ".checkov.yaml"), "--framework", framework, "-o", "json"]
    for target in targets:
        cmd += ["-d" if target.is_dir() else "-f", str(target)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    reports = _json_documents(proc.stdout)
    result = CheckovResult()
    for report in reports:
        if not isinstance(report, dict) or "results" not in report:
            continue
        res = report["results"]
        result.passed += len(res.get("passed_checks", []))
        result.failed += len(res.get("failed_checks", []))
        result.skipped += len(res.get("skipped_checks", []))
        result.failures += [
            f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
            for c in res.get("failed_checks", [])
        ]
        result.skips += sorted({c["check_id"] for c in res.get("skipped_checks", [])})
    if proc.returncode not in (0, 1) or (not reports and proc.stderr):
        raise RuntimeError(f"checkov did not run cleanly (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return result


def _json_documents(text: str) -> list:
    """checkov prints one JSON value per scanned folder, back to back; each may be a list of reports."""
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while (pos := _skip_space(text, pos)) < len(text):
        value, pos = decoder.raw_decode(text, pos)
        docs.extend(value if isinstance(value, list) else [value])
    return docs


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def hadolint(files: list[Path] = DOCKERFILES) -> list[str]:
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run(
        [binary, "--config", str(REPO / ".hadolint.yaml"), "-f", "json", *map(str, files)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    findings = json.loads(proc.stdout or "[]")
    if proc.returncode and not findings:
        raise RuntimeError(f"hadolint failed: {proc.stderr}")
    return [f"{Path(f['file']).relative_to(REPO)}:{f['line']} {f['code']} {f['message']}" for f in findings]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.cluster.check", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "build" / "cluster", help="render folder (default build/cluster)"
    )
    args = parser.parse_args(argv)
    failures: list[str] = []

    def report(name: str, problems: list[str], ok: str) -> None:
        print(f"{'FAIL' if problems else 'ok  '} {name}: {ok if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"       {p}")
        failures.extend(problems)

    for name, out in render_variants(args.out).items():
        kinds = sorted({d["kind"] for d in manifest_docs(out)})
        print(f"rendered {name} -> {out}: {len(manifest_docs(out))} objects ({', '.join(kinds)})")
        checked, errors = kubernetes_validate(out)
        report(
            f"kubernetes-validate --strict [{name}]", errors, f"{checked} core objects x {len(KUBE_VERSIONS)} versions"
        )
        pods, refused = pod_security(out)
        report(f"Pod Security admission [{name}]", refused, f"{pods} pods admitted")
        try:
            report(f"CRD jsonschema [{name}]", [], f"{custom_resources(out)} custom resources")
        except ValueError as err:
            report(f"CRD jsonschema [{name}]", [str(err)], "")
        report(f"yamllint [{name}]", yamllint(out), "clean")
        result = checkov([out], "kubernetes")
        report(
            f"checkov kubernetes [{name}]",
            result.failures,
            f"passed {result.passed}, failed {result.failed}, skipped {result.skipped} {sorted(set(result.skips))}",
        )
    for values in [None, *VALUES_FILES]:
        report(f"helm lint --strict [{values.name if values else 'default'}]", helm_lint(values), "clean")
    result = checkov(DOCKERFILES, "dockerfile")
    report(
        "checkov dockerfile",
        result.failures,
        f"passed {result.passed}, failed {result.failed}, skipped {result.skipped}",
    )
    report("hadolint", hadolint(), f"{len(DOCKERFILES)} Dockerfiles clean")
    print(f"checkov checks off by .checkov.yaml (justified there): {', '.join(checkov_config_skips()) or 'none'}")
    print("all cluster checks passed" if not failures else f"{len(failures)} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
