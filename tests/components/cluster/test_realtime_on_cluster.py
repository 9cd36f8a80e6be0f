"""`/v1/realtime` behind KServe, Knative and Kourier: a session is one WebSocket, which every proxy sees
as one long HTTP request. The rendered InferenceServices and the cluster-wide patches infra/install.sh
applies must keep it open longer than the server's own session limit (serving.realtime.max_session_s,
the one source), so that the server's close frame, which names the limit, is what ends it; and they
must follow the config when it changes."""

from __future__ import annotations

import math

import pytest
import yaml

from components.cluster import cluster_wide, endpoint
from components.cluster import render as cluster
from components.config import load_config
from pipelines.cli import main as omni

GITOPS = cluster.CHART_DIR / "ci" / "gitops-values.yaml"  # renders the chart's champion too
# config-defaults as Knative ships it (knative.dev/docs serving/configuration/config-defaults).
KNATIVE_SHIPPED = {"revision-timeout-seconds": "300", "max-revision-timeout-seconds": "600",
                   "revision-response-start-timeout-seconds": "300", "revision-idle-timeout-seconds": "0"}


def _isvcs(out) -> list[dict]:
    return [d for d in cluster.manifest_docs(out) if d["kind"] == "InferenceService"]


def _check_defaults(data: dict[str, str]) -> None:
    """Knative's own check of config-defaults (pkg/apis/config/defaults.go): a patch it refuses
    would leave the cluster on the old values."""
    timeout, ceiling = int(data["revision-timeout-seconds"]), int(data["max-revision-timeout-seconds"])
    assert timeout <= ceiling
    for key in ("revision-response-start-timeout-seconds", "revision-idle-timeout-seconds"):
        assert int(data[key]) == 0 or int(data[key]) <= timeout, key


def _revision_timeouts(data: dict[str, str], timeout_s: int) -> dict[str, int | None]:
    """The revision KServe v0.20.0 asks Knative for, from the InferenceService's `timeout`
    (ksvc_reconciler.go: timeoutSeconds and responseStartTimeoutSeconds both set to it), as Knative
    admits and defaults it: refused above the ceiling; the cluster's idle default put on only when
    non-zero and under its timeout (pkg/apis/serving/v1/revision_defaults.go)."""
    if timeout_s > int(data["max-revision-timeout-seconds"]):
        raise ValueError(f"timeoutSeconds {timeout_s} over max-revision-timeout-seconds")
    idle = int(data["revision-idle-timeout-seconds"])
    return {"timeoutSeconds": timeout_s, "responseStartTimeoutSeconds": timeout_s,
            "idleTimeoutSeconds": idle if 0 < idle < timeout_s else None}


def test_every_rendered_inferenceservice_outlasts_a_session(cfg, tmp_path):
    cluster.render_all(cfg, tmp_path, GITOPS)  # also validates them against KServe's CRD
    isvcs = _isvcs(tmp_path)
    assert len(isvcs) == 2  # the chart's champion and the one promote applies
    session = cfg.serving.realtime.max_session_s
    for isvc in isvcs:
        timeout = isvc["spec"]["predictor"]["timeout"]
        assert timeout == math.ceil(session) + endpoint.SESSION_CLOSE_MARGIN_S, isvc["metadata"]
        assert timeout > session  # the server's close frame comes first
        assert timeout > cfg.serving.limits.request_timeout_s


def test_knative_admits_the_revision_and_adds_no_shorter_timeout(cfg):
    timeout = endpoint.request_timeout_s(cfg)
    with pytest.raises(ValueError, match="over max-revision-timeout-seconds"):  # as Knative ships: refused
        _revision_timeouts(KNATIVE_SHIPPED, timeout)
    # A cluster whose idle default is set (here 120 s, with the ceiling already raised) would cut a quiet session.
    tuned = {**KNATIVE_SHIPPED, "max-revision-timeout-seconds": "7200", "revision-idle-timeout-seconds": "120"}
    assert _revision_timeouts(tuned, timeout)["idleTimeoutSeconds"] == 120
    for before in (KNATIVE_SHIPPED, tuned):
        patched = {**before, **cluster_wide.knative_timeouts_patch(cfg)["data"]}
        _check_defaults(patched)
        revision = _revision_timeouts(patched, timeout)
        assert revision == dict(timeoutSeconds=timeout, responseStartTimeoutSeconds=timeout, idleTimeoutSeconds=None)
    # Revisions at Knative's default timeout are admitted and defaulted as before the patch.
    patched = {**KNATIVE_SHIPPED, **cluster_wide.knative_timeouts_patch(cfg)["data"]}
    assert _revision_timeouts(patched, 300) == _revision_timeouts(KNATIVE_SHIPPED, 300)


def test_the_activator_and_kourier_hold_a_session_as_long(cfg):
    ceiling = int(cluster_wide.knative_timeouts_patch(cfg)["data"]["max-revision-timeout-seconds"])
    grace = cluster_wide.activator_grace_patch(cfg)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == ceiling >= endpoint.request_timeout_s(cfg)
    idle = cluster_wide.kourier_timeouts_patch(cfg)["data"]["stream-idle-timeout"]
    assert idle == f"{endpoint.request_timeout_s(cfg)}s"


def test_the_settings_follow_the_session_length(tmp_path, capsys):
    out = tmp_path / "long"
    assert omni(["cluster", "render", "--out", str(out), "--values", str(GITOPS),
                 "serving.realtime.max_session_s=3600"]) == 0
    assert {i["spec"]["predictor"]["timeout"] for i in _isvcs(out)} == {3660}
    longer = load_config(["serving.realtime.max_session_s=3600"])
    assert cluster_wide.knative_timeouts_patch(longer)["data"]["max-revision-timeout-seconds"] == "3660"
    assert cluster_wide.kourier_timeouts_patch(longer)["data"]["stream-idle-timeout"] == "3660s"
    # Shorter sessions: the HTTP deadline still fits, and Knative's shipped ceiling is never lowered.
    short = load_config(["serving.realtime.max_session_s=30"])
    assert endpoint.request_timeout_s(short) == math.ceil(short.serving.limits.request_timeout_s) + 60
    assert cluster_wide.knative_timeouts_patch(short)["data"]["max-revision-timeout-seconds"] == "600"


def test_a_values_file_cannot_shorten_the_timeout(cfg):
    values = yaml.safe_load(GITOPS.read_text())
    values["endpoint"]["timeoutSeconds"] = 300
    with pytest.raises(cluster.ValuesConflict, match="endpoint.timeoutSeconds=300 but conf/cluster says 1860"):
        cluster.render_chart(cfg, values)


def test_the_upgrade_reaches_the_predictor_over_http1_and_install_applies_the_patches(cfg):
    docs, _ = cluster.render_chart(cfg, {})
    runtime = next(d for d in docs if d["kind"] == "ServingRuntime")
    # A port named h2c makes Knative speak HTTP/2 to the container, where an HTTP/1.1 Upgrade cannot pass.
    assert all(p.get("name") != "h2c" for p in runtime["spec"]["containers"][0]["ports"])
    script = (cluster.INFRA_DIR / "install.sh").read_text()
    knative = script[script.index("\nknative() {"):script.index("\nkserve() {")]
    after_kourier = knative[knative.index("kourier.yaml"):]  # config-kourier exists only from here
    for what, target in (("knative-timeouts", "configmap/config-defaults"), ("activator-grace", "deployment/activator"),
                         ("kourier-timeouts", "configmap/config-kourier")):
        assert f"{target} -n knative-serving --type merge -p \"$(omni_conf {what})\"" in after_kourier, what
    assert set(cluster_wide.PATCHES) >= {"knative-timeouts", "activator-grace", "kourier-timeouts"}
