"""The documented path (docs/deploy.md) read against the pinned upstreams: one test per thing that
would stop a platform team between the install and a serving endpoint. Rendered manifests of every
values file are checked for the property itself, so each test fails with its fix reverted."""

from __future__ import annotations

import re

import pytest
from minio import Minio

from components.cluster import endpoint
from components.cluster import render as cluster
from components.cluster.check import VALUES_FILES
from tests.s3_server import s3_server_fixture

VARIANTS = {"default": None, **{p.name.removesuffix("-values.yaml"): p for p in VALUES_FILES}}


@pytest.fixture(scope="module")
def charts(cfg) -> dict[str, list[dict]]:
    """The chart's objects for the defaults and each ci/*-values.yaml, as `omni cluster render` makes them."""
    return {name: cluster.render_chart(cfg, cluster.load_values(path))[0] for name, path in VARIANTS.items()}


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


# 2. Tenancy: the Role is bound to the identity the documented KFP install runs tasks as.

def _installed_kfp_namespace() -> str:
    """infra/install.sh installs standalone KFP (env/platform-agnostic) and waits in this namespace."""
    script = (cluster.INFRA_DIR / "install.sh").read_text()
    kfp = script[script.index("\nkfp() {"):]
    assert "env/platform-agnostic" in kfp, "install.sh no longer installs standalone KFP: update cluster.kfp"
    return re.search(r"wait_deployments (\S+)", kfp).group(1)


def test_role_is_bound_to_the_task_identity_of_the_installed_kfp(cfg, charts) -> None:
    # Standalone KFP runs every run as its DefaultPipelineRunnerServiceAccount, `pipeline-runner`,
    # in its own namespace; multi-user Kubeflow as `default-editor` in the profile namespace.
    assert cfg.cluster.kfp.mode == "standalone"
    expected = [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": _installed_kfp_namespace()}]
    for name, docs in charts.items():
        assert _one(docs, "RoleBinding")["subjects"] == expected, name


def test_multi_user_kubeflow_binds_default_editor_in_the_profile_namespace() -> None:
    from components.config import load_config

    multi = load_config(["cluster.kfp.mode=multi-user"])
    docs, _ = cluster.render_chart(multi, {})
    assert _one(docs, "RoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "default-editor", "namespace": multi.cluster.namespace}]


def test_a_values_file_cannot_rebind_the_role_away_from_conf(cfg) -> None:
    other = {"pipelineRunner": {"subjects": [{"kind": "ServiceAccount", "name": "default-editor",
                                              "namespace": "kubeflow-user"}]}}
    with pytest.raises(cluster.ValuesConflict, match="pipelineRunner.subjects"):
        cluster.render_chart(cfg, other)
    with pytest.raises(cluster.ValuesConflict, match="mlflowClientNamespaces"):
        cluster.render_chart(cfg, {"networkPolicies": {"enabled": True, "mlflowClientNamespaces": [],
                                                       "ingressNamespaces": ["knative-serving"]}})


def test_promote_leaves_a_helm_managed_champion_alone(cfg, charts, fake_kube) -> None:
    live = _one(charts["gitops"], "InferenceService")
    key = ("serving.kserve.io", "v1beta1", live["metadata"]["namespace"], "inferenceservices",
           live["metadata"]["name"])
    fake_kube.custom.objects[key] = {**live, "metadata": {**live["metadata"], "generation": 1}}
    new = endpoint.champion_isvc(cfg, "s3://omni-mlflow/artifacts/1/new/artifacts/model", "8")
    with pytest.raises(endpoint.OwnedByHelm, match="endpoint.enabled"):
        endpoint.rollout(cfg, new, fake_kube, sleep=lambda _: None, emit=lambda _: None)
    assert fake_kube.custom.verbs() == []  # nothing was patched


# 3. Pod Security: the predictor pod, with the storage initializer KServe injects, is admitted.

def _predictor_pods(charts, cfg):
    for name, docs in charts.items():
        runtime = _one(docs, "ServingRuntime")
        isvcs = [d for d in docs if d["kind"] == "InferenceService"] or [cluster.champion_example(cfg, {})]
        for isvc in isvcs:
            yield name, runtime, isvc


def test_predictor_pod_with_the_storage_initializer_passes_the_enforced_level(cfg, charts) -> None:
    from components.cluster import cluster_wide, pod_security

    level = cluster.namespace_manifest(cfg)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    assert level == cfg.cluster.pod_security == "restricted"
    ours = cluster_wide.storage_container()
    for name, runtime, isvc in _predictor_pods(charts, cfg):
        assert pod_security.violations(cluster_wide.serving_pod(runtime, isvc, ours), level) == [], name
        # KServe's own default container (no securityContext) is what restricted refused.
        upstream = {"spec": {"container": {k: v for k, v in ours["spec"]["container"].items()
                                           if k != "securityContext"}}}
        refused = pod_security.violations(cluster_wide.serving_pod(runtime, isvc, upstream), level)
        assert "allowPrivilegeEscalation != false (container storage-initializer)" in refused, name
        assert "runAsNonRoot != true (container storage-initializer)" in refused, name


def test_the_storage_container_replaces_kserves_default_and_is_applied_by_install(cfg) -> None:
    from components.cluster import cluster_wide
    from serving.manifests import _validator

    sc = cluster_wide.storage_container()
    assert sc["metadata"]["name"] == "default"  # KServe's: ours must win for s3://, not race with it
    assert {"prefix": "s3://"} in sc["spec"]["supportedUriFormats"]
    assert sc["spec"]["container"]["image"] == "kserve/storage-initializer:v0.20.0"
    # spec.container is a core Container: validate it with the Container schema of the pinned CRDs.
    runtime_schema = _validator(cluster.REPO / "serving" / "crds", "serving.kserve.io", "v1alpha1",
                                "ServingRuntime").schema
    container_schema = runtime_schema["properties"]["spec"]["properties"]["containers"]["items"]
    import jsonschema

    jsonschema.Draft7Validator(container_schema).validate(sc["spec"]["container"])
    script = (cluster.INFRA_DIR / "install.sh").read_text()
    kserve = script[script.index("\nkserve() {"):script.index("\ntrainer() {")]
    assert "omni_conf storage-container | kubectl apply" in kserve


def test_pod_security_rules_catch_what_they_should() -> None:
    from components.cluster import pod_security

    good = {"containers": [{"name": "c", "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"}}}], "volumes": [{"name": "t", "emptyDir": {}}]}
    assert pod_security.violations(good, "restricted") == []
    bad = {**good, "hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    assert pod_security.violations(bad, "baseline") == ["host namespaces (hostNetwork=true)", "hostPath volume h"]
    assert "restricted volume type hostPath (h)" in pod_security.violations(bad, "restricted")
    root = {"containers": [{"name": "c", "securityContext": {**good["containers"][0]["securityContext"],
                                                             "runAsUser": 0}}]}
    assert pod_security.violations(root, "restricted") == ["runAsUser=0 (container c)"]
    assert pod_security.violations(root, "baseline") == []


def test_every_rendered_pod_passes_the_namespace_level(tmp_path, cfg) -> None:
    from components.cluster import check as cluster_check

    for name, path in VARIANTS.items():
        cluster.render_all(cfg, tmp_path / name, path)
        pods, refused = cluster_check.pod_security(tmp_path / name)
        assert refused == [] and pods >= 3, name


# 4. The endpoint: status.url is a host the installed ingress routes.

def test_status_url_is_the_predictor_host_kourier_routes(cfg) -> None:
    import json

    from components.cluster import cluster_wide

    # KServe v0.20.0's shipped ingress config (config/configmap/inferenceservice.yaml) routes through Istio.
    shipped = json.dumps({"ingressGateway": "knative-serving/knative-ingress-gateway",
                          "localGateway": "knative-serving/knative-local-gateway",
                          "ingressDomain": "example.com", "ingressClassName": "istio",
                          "domainTemplate": "{{ .Name }}-{{ .Namespace }}.{{ .IngressDomain }}",
                          "urlScheme": "http", "disableIstioVirtualHost": False})
    patched = json.loads(cluster_wide.kserve_ingress_patch(shipped, cfg)["data"]["ingress"])
    assert patched["disableIstioVirtualHost"] is True  # no VirtualService: status.url = predictor's ksvc URL
    assert patched["ingressDomain"] == cfg.cluster.ingress.domain and patched["localGateway"]  # the rest kept
    # Knative serves exactly that domain (config-domain), so Kourier has a route for the host.
    assert cluster_wide.knative_domain_patch(cfg) == {"data": {cfg.cluster.ingress.domain: ""}}
    host = cluster_wide.predictor_host(cfg)
    assert host == f"omni-predictor.{cfg.cluster.namespace}.{cfg.cluster.ingress.domain}"
    script = (cluster.INFRA_DIR / "install.sh").read_text()
    assert "config-domain" in script and "omni_conf kserve-ingress" in script
    doc = (cluster.REPO / "docs" / "deploy.md").read_text()
    assert "{.status.url}" in doc and "kourier" in doc


# 5. Registering a real model: spool disk, buckets, boto3 checksums.

def _mlflow(docs: list[dict]) -> dict:
    return _one(docs, "Deployment", "omni-mlflow")["spec"]["template"]["spec"]


def _quantity_bytes(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q)).groups()
    return float(number) * units.get(unit, 1)


def test_mlflow_spool_holds_the_uploads_it_proxies(charts) -> None:
    from mlflow.environment_variables import MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE

    threshold = MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE.default  # larger files bypass the proxy
    for name, docs in charts.items():
        pod = _mlflow(docs)
        server = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in server["env"]}
        spool_dir = env["TMPDIR"]
        mount = next(m for m in server["volumeMounts"] if spool_dir.startswith(m["mountPath"]))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        size = _quantity_bytes(volume["emptyDir"]["sizeLimit"])
        # Room for 16 concurrent proxied uploads, each just under the threshold, requested so the
        # kubelet does not evict the pod for using it.
        assert size >= 16 * threshold, name
        assert _quantity_bytes(server["resources"]["requests"]["ephemeral-storage"]) >= size, name
        assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == env["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_required"


def test_bundled_minio_gets_mlflows_and_the_staging_bucket(cfg, charts) -> None:
    pod = _mlflow(charts["production"])  # minio.enabled
    (init,) = pod["initContainers"]
    script = init["args"][0]
    assert "python -m components.cluster.buckets" in script
    for uri in (cfg.cluster.endpoint.mlflow_artifacts_root, cfg.cluster.trainer.staging_uri):
        assert f'"{uri}"' in script
    assert "initContainers" not in _mlflow(charts["default"])  # external object storage: its buckets are yours


s3_server = s3_server_fixture()


def test_ensure_buckets_creates_them_on_a_real_s3_server(s3_server, monkeypatch, capsys) -> None:
    from components.cluster import buckets

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    assert buckets.main(["s3://omni-mlflow/artifacts", "s3://omni-platform/trainjobs", "s3://omni-mlflow/x"]) == 0
    assert capsys.readouterr().out.splitlines() == ["bucket omni-mlflow ready", "bucket omni-platform ready"]
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
    assert client.bucket_exists("omni-mlflow") and client.bucket_exists("omni-platform")
    assert buckets.main(["s3://omni-mlflow/artifacts"]) == 0  # idempotent
    with pytest.raises(ValueError, match="expected s3://bucket"):
        buckets.ensure_buckets(["gs://x"])


# 6. Startup of a large predictor: probes and deadlines that fit a cold start.

def _probe_budget_s(probe: dict) -> float:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def test_predictor_probes_and_deadlines_fit_a_cold_start(cfg, charts) -> None:
    ep = cfg.cluster.endpoint
    for name, docs in charts.items():
        container = _one(docs, "ServingRuntime")["spec"]["containers"][0]
        # A startupProbe holds liveness off until the port answers, for the whole startup budget.
        assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live", name
        assert _probe_budget_s(container["startupProbe"]) >= ep.startup_timeout_s, name
        # Readiness is the model-aware route (serving.protocol.repository.readiness_router).
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready", name
        for isvc in [d for d in docs if d["kind"] == "InferenceService"] or [cluster.champion_example(cfg, {})]:
            deadline = isvc["metadata"]["annotations"]["serving.knative.dev/progress-deadline"]
            assert deadline == f"{int(ep.progress_deadline_s)}s", name
            assert isvc["spec"]["predictor"]["containerConcurrency"] == ep.container_concurrency, name
    # Promote waits at least as long as Knative keeps trying, and refuses a config that would not.
    assert ep.ready_timeout_s >= ep.progress_deadline_s
    from components.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="ready_timeout_s .* < progress_deadline_s"):
        load_config(["cluster.endpoint.ready_timeout_s=600"])


def test_the_concurrency_target_matches_what_one_replica_batches(cfg) -> None:
    # A replica batches at most serving.limits.max_batch_size rows per request; Knative should not
    # hold more requests in flight per replica than one batch serves, nor starve the batcher.
    assert 1 <= cfg.cluster.endpoint.container_concurrency <= 4 * cfg.serving.limits.max_batch_size


# 7. Multi-node TrainJobs: peers can reach each other, state survives a pod, NCCL is configured.

def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": has and value in e.get("values", []), "NotIn": not has or value not in e.get("values", []),
              "Exists": has, "DoesNotExist": not has}[e["operator"]]
        if not ok:
            return False
    return True


def _trainjob_pod_labels(runtime: dict, job: dict) -> dict[str, str]:
    """The labels a TrainJob's node pod carries: the pod template's (runtime, then the TrainJob's
    runtime patch), plus the ones JobSet and the Job controller add. The replicated job's own
    template labels stay on the Job: JobSet does not copy them to pods."""
    rjob = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    labels = dict(rjob["template"]["spec"]["template"].get("metadata", {}).get("labels") or {})
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    labels.update(patch["template"]["spec"]["template"].get("metadata", {}).get("labels") or {})
    name = job["metadata"]["name"]
    labels.update({"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"],
                   "jobset.sigs.k8s.io/job-index": "0", "batch.kubernetes.io/job-name": f"{name}-{rjob['name']}-0",
                   "batch.kubernetes.io/job-completion-index": "0"})
    return labels


def test_the_peer_policy_selects_labels_trainjob_pods_carry(cfg, charts) -> None:
    job = cluster.example_trainjob(cfg)
    for name, docs in charts.items():
        runtime = _one(docs, "TrainingRuntime")
        pod = _trainjob_pod_labels(runtime, job)
        policy = _one(docs, "NetworkPolicy", "omni-trainjob-peers")["spec"]
        assert _selects(policy["podSelector"], pod), name  # the policy applies to the node pods...
        assert any(_selects(peer["podSelector"], pod) for rule in policy["ingress"] for peer in rule["from"]), name
        # ...and the Job-level label alone would select nothing (what the old policy used).
        job_labels = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["metadata"]["labels"]
        assert not set(job_labels) & set(policy["podSelector"]["matchLabels"]), name


def test_trainjob_state_is_shared_durable_and_restarted(cfg, charts) -> None:
    job = cluster.example_trainjob(cfg)
    args = job["spec"]["trainer"]["args"]
    checkpoints = args[args.index("--checkpoints") + 1]
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if checkpoints.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]  # not an emptyDir: outlives the pods
    assert claim == cfg.cluster.trainer.checkpoint_claim
    for name, docs in charts.items():
        pvc = _one(docs, "PersistentVolumeClaim", claim)
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], name  # every node pod mounts it
        runtime = _one(docs, "TrainingRuntime")
        assert runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] == cfg.cluster.trainer.max_restarts


def test_trainjob_pods_get_the_nccl_settings_of_the_gpu_machine_type(cfg) -> None:
    job = cluster.example_trainjob(cfg)
    env = {e["name"]: e.get("value") for e in job["spec"]["trainer"]["env"]}
    pool = cfg.cluster.gpu_pool.node_pool
    assert pool.machine_type == "a3-highgpu-8g" and pool.nccl_env
    assert {k: env.get(k) for k in pool.nccl_env} == pool.nccl_env
    assert env["NCCL_SOCKET_IFNAME"] == "eth0"  # the pod network interface on GKE


def test_a_restarted_stage_resumes_from_the_shared_checkpoint(cfg, tmp_path, monkeypatch) -> None:
    """steps.train with the TrainJob's checkpoint folder keeps the DeepSpeed state there (the emptyDir
    default deletes it), so the next attempt starts from `latest` instead of step 0."""
    from components.steps import training as steps
    from model.training.recipe import TrainResult

    seen: list = []

    def fake_stage(model, processor, dataset, stage, checkpoint_dir, progress):
        seen.append(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (checkpoint_dir / "latest").write_text("global_step4")
        return TrainResult(losses=[1.0], seconds=1.0, tokens=1, trainable_params=1)

    monkeypatch.setattr(steps, "train_stage", fake_stage)
    monkeypatch.setattr(steps, "build_for_stage", lambda d, stage: _Saver())
    monkeypatch.setattr(steps, "load_tokenizer", lambda d: None)
    monkeypatch.setattr(steps, "OmniProcessor", lambda *a: None)
    monkeypatch.setattr(steps, "_train_stream", lambda *a: type("D", (), {"num_samples": lambda self: 1})())
    monkeypatch.setattr(steps.runtime, "ranks", lambda: type("W", (), {"primary": False})())
    shared = tmp_path / "checkpoints" / "job"
    steps.train(cfg, "sft", tmp_path, tmp_path, tmp_path / "out", "p", checkpoint_dir=shared)
    assert seen == [shared] and (shared / "latest").read_text() == "global_step4"  # kept for a restart


class _Saver:
    cfg = None

    def save_pretrained(self, *a) -> None:  # pragma: no cover - rank > 0 saves nothing
        raise AssertionError("only rank 0 saves")


# 8. Canary and rollback.

def _two_rollouts(cfg, fake_kube, tmp_path, controller, **endpoint_update):
    from tests.components.cluster.fake_kube import FakeKServe

    ep = cfg.cluster.endpoint.model_copy(update={"canary_hold_s": 30, "ready_timeout_s": 5, **endpoint_update})
    c = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"target": "kubernetes", "endpoint": ep})})
    fake_kube.custom.controller = FakeKServe()
    quiet = {"emit": lambda _: None, "sleep": lambda _: None}
    endpoint.rollout(c, endpoint.champion_isvc(c, "s3://m/1"), fake_kube, **quiet)
    fake_kube.custom.controller = controller
    fake_kube.custom.calls.clear()
    return c, quiet


def _canary_shares(fake_kube) -> list:
    return [b["spec"]["predictor"].get("canaryTrafficPercent") for v, _, b in fake_kube.custom.calls if v == "patch"]


def test_a_failed_canary_returns_its_traffic_to_the_previous_revision(cfg, fake_kube, tmp_path) -> None:
    from tests.components.cluster.fake_kube import FakeKServe

    c, quiet = _two_rollouts(cfg, fake_kube, tmp_path, FakeKServe(ready=False))
    with pytest.raises(endpoint.RolloutFailed, match="canary was set to 0%"):
        endpoint.rollout(c, endpoint.champion_isvc(c, "s3://m/2"), fake_kube, **quiet)
    assert _canary_shares(fake_kube) == [10, 0]  # never left at 10%


def test_a_canary_whose_pods_restart_while_held_fails(cfg, fake_kube, tmp_path) -> None:
    from tests.components.cluster.fake_kube import FakeKServe

    c, quiet = _two_rollouts(cfg, fake_kube, tmp_path, FakeKServe())
    fake_kube.core.pods["omni-predictor-00002-deployment-a"] = "Running"
    polls = iter([(True, 0), (True, 0), (True, 1)])  # OOM-killed under canary traffic on the 2nd poll

    def watch(namespace, label_selector=""):
        fake_kube.core.health["omni-predictor-00002-deployment-a"] = next(polls, (True, 1))
        return type(fake_kube.core).list_namespaced_pod(fake_kube.core, namespace, label_selector)

    fake_kube.core.list_namespaced_pod = watch
    with pytest.raises(endpoint.RolloutFailed, match=r"restarted \['omni-predictor-00002-deployment-a'\]"):
        endpoint.rollout(c, endpoint.champion_isvc(c, "s3://m/2"), fake_kube, **quiet)
    assert _canary_shares(fake_kube) == [10, 0]
    assert "serving.knative.dev/revision=omni-predictor-00002" in fake_kube.core.selectors


def test_readiness_is_judged_by_revisions_not_by_copied_generations(cfg) -> None:
    # KServe copies Knative's observedGeneration: right after a patch it can already be >= the
    # InferenceService's generation while the old revision still serves. That is not rolled out.
    stale = {"metadata": {"generation": 3}, "status": {
        "observedGeneration": 7, "conditions": [{"type": "Ready", "status": "True"}],
        "components": {"predictor": {"latestCreatedRevision": "omni-predictor-00001",
                                     "latestReadyRevision": "omni-predictor-00001",
                                     "traffic": [{"latestRevision": True, "percent": 100}]}}}}
    assert not endpoint.is_rolled_out(stale, "omni-predictor-00001", 100)
    fresh = {**stale, "status": {**stale["status"], "components": {"predictor": {
        "latestCreatedRevision": "omni-predictor-00002", "latestReadyRevision": "omni-predictor-00002",
        "traffic": [{"latestRevision": True, "percent": 10}, {"latestRevision": False, "percent": 90}]}}}}
    assert endpoint.is_rolled_out(fresh, "omni-predictor-00001", 10)
    assert not endpoint.is_rolled_out(fresh, "omni-predictor-00001", 100)  # still a canary


def test_kserves_rollback_share_zero_is_accepted_by_the_chart(cfg) -> None:
    values = {"endpoint": {"enabled": True, "storageUri": "s3://b/m", "canaryTrafficPercent": 0}}
    docs, _ = cluster.render_chart(cfg, values)
    assert _one(docs, "InferenceService")["spec"]["predictor"]["canaryTrafficPercent"] == 0


# Also missing for a platform team: a backup of MLflow's database.

def test_mlflow_database_is_backed_up_nightly_to_object_storage(charts) -> None:
    for name, docs in charts.items():
        cron = _one(docs, "CronJob", "omni-mlflow-db-backup")["spec"]
        pod = cron["jobTemplate"]["spec"]["template"]["spec"]
        assert "pg_dump" in pod["initContainers"][0]["args"][0], name
        assert "s3://" in pod["containers"][0]["args"][0] and cron["concurrencyPolicy"] == "Forbid", name
        labels = cron["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
        mlflow_service = _one(docs, "Service", "omni-mlflow")["spec"]["selector"]
        assert not _selects({"matchLabels": mlflow_service}, labels), name  # not an MLflow endpoint
        if name == "production":  # bundled PostgreSQL: the policy lets the backup in
            policy = _one(docs, "NetworkPolicy", "omni-postgresql")["spec"]
            assert any(_selects(p["podSelector"], labels) for r in policy["ingress"] for p in r["from"])


class _QueueProxy:
    """A queue-proxy metrics page on 127.0.0.1 (prometheus_client's own exposition format), whose
    counters the test moves between the scrapes at the start and the end of the hold."""

    def __init__(self):
        import http.server
        import threading

        from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

        self.registry = CollectorRegistry()
        self.count = Counter("revision_app_request_count", "requests", ["response_code_class"],
                             registry=self.registry)
        self.latency = Histogram("revision_app_request_latencies", "ms", buckets=(100, 1000, 10000, 60000),
                                 registry=self.registry)
        registry = self.registry

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, n: int, code_class: str, ms: float) -> None:
        for _ in range(n):
            self.count.labels(code_class).inc()
            self.latency.observe(ms)


@pytest.fixture
def queue_proxy(monkeypatch):
    from components.cluster import canary_metrics

    qp = _QueueProxy()
    monkeypatch.setattr(canary_metrics, "QUEUE_METRICS_PORT", qp.port)
    yield qp
    qp.server.shutdown()


@pytest.mark.parametrize("served, fails", [
    ([(95, "2xx", 400), (5, "5xx", 400)], r"answered 5\.0% of 100 requests with a 5xx"),  # error rate
    ([(100, "2xx", 45000)], r"p95 60\.00s \(limit 30s\)"),  # latency
    ([(100, "2xx", 400), (1, "5xx", 400)], None),  # within the limits: all traffic moves
    ([(3, "5xx", 400)], None),  # too few requests to judge rates
])
def test_the_canary_is_judged_on_the_requests_it_served(cfg, fake_kube, tmp_path, queue_proxy, served, fails):
    from tests.components.cluster.fake_kube import FakeKServe

    c, quiet = _two_rollouts(cfg, fake_kube, tmp_path, FakeKServe())
    pod = "omni-predictor-00002-deployment-a"
    fake_kube.core.pods[pod], fake_kube.core.ips[pod] = "Running", "127.0.0.1"
    queue_proxy.serve(500, "5xx", 90000)  # before the hold: the old traffic does not count
    polls = iter(range(100))

    def traffic(namespace, label_selector=""):
        if next(polls) == 1:  # between the first and the last scrape
            for n, code, ms in served:
                queue_proxy.serve(n, code, ms)
        return type(fake_kube.core).list_namespaced_pod(fake_kube.core, namespace, label_selector)

    fake_kube.core.list_namespaced_pod = traffic
    if fails:
        with pytest.raises(endpoint.RolloutFailed, match=fails):
            endpoint.rollout(c, endpoint.champion_isvc(c, "s3://m/2"), fake_kube, **quiet)
        assert _canary_shares(fake_kube) == [10, 0]
    else:
        endpoint.rollout(c, endpoint.champion_isvc(c, "s3://m/2"), fake_kube, **quiet)
        assert _canary_shares(fake_kube) == [10, None]


def test_promote_may_read_the_canary_metrics_port(charts) -> None:
    for name, docs in charts.items():
        rules = _one(docs, "NetworkPolicy", "omni-predictor")["spec"]["ingress"]
        kfp = [r for r in rules if any((p.get("namespaceSelector") or {}).get("matchLabels", {})
                                       .get("kubernetes.io/metadata.name") == "kubeflow" for p in r["from"])]
        assert any({"port": 9091, "protocol": "TCP"} in r["ports"] for r in kfp), name
