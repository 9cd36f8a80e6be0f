"""Multi-node stages as Kubeflow Trainer TrainJobs: the object (validated against the real CRD),
the launcher task the DAG gets for such a stage, and submit/wait/logs/failure against an in-process
fake of the Kubernetes client (not a real API server)."""

from __future__ import annotations

import copy
import json
import re

import pytest

from components import kube as k8s
from components import trainjob
from model.storage import open_store
from serving.manifests import validate_custom_resource


def _with_stage(cfg, name="sft", **update):
    stage = cfg.stages[name].model_copy(update=update)
    return cfg.model_copy(update={"stages": {**cfg.stages, name: stage}})


def test_dispatch_rule(cfg) -> None:
    assert not trainjob.needs_trainjob(cfg, "sft")  # the tiny recipe: one node, no GPUs
    assert trainjob.needs_trainjob(_with_stage(cfg, nodes=2), "sft")
    limit = cfg.cluster.gpu_pool.accelerator_limit
    assert not trainjob.needs_trainjob(_with_stage(cfg, gpus_per_node=limit), "sft")
    assert trainjob.needs_trainjob(_with_stage(cfg, gpus_per_node=limit + 1), "sft")


def test_trainjob_carries_stage_image_resources_and_placement(cfg) -> None:
    c = _with_stage(cfg, nodes=2, gpus_per_node=8)
    job = trainjob.build_trainjob(c, "sft", "omni-sft-abc", "s3://b/trainjobs/omni-sft-abc", "run-1")
    validate_custom_resource(job)  # the real TrainJob CRD; unknown fields fail
    spec = job["spec"]
    assert (
        job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["metadata"]["namespace"] == cfg.cluster.namespace
    )
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
        "name": cfg.cluster.trainer.runtime,
    }
    t = spec["trainer"]
    assert t["image"] == cfg.cluster.images.ref("gpu")
    assert t["command"] == ["torchrun", "-m", "components.train_entry"]
    assert t["args"] == ["--staging", "s3://b/trainjobs/omni-sft-abc", "--stage", "sft", "--parent-run-id", "run-1"]
    assert t["numNodes"] == 2 and t["numProcPerNode"] == 8
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert {e["name"] for e in t["env"]} == {"S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"
    ]["spec"]
    assert pod["nodeSelector"] == cfg.cluster.gpu_pool.node_selector
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]

    typo = copy.deepcopy(job)
    typo["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(ValueError, match=r"spec\.trainer\.numNode: unknown field"):
        validate_custom_resource(typo)


def test_impossible_stage_is_refused_with_the_field_to_fix(cfg) -> None:
    with pytest.raises(ValueError, match=r"stages\.sft\.gpus_per_node=16 .* 8 GPUs"):
        trainjob.build_trainjob(_with_stage(cfg, nodes=2, gpus_per_node=16), "sft", "j", "s3://b/j", "r")
    with pytest.raises(ValueError, match=r"stages\.sft\.nodes=9 exceeds cluster\.gpu_pool\.node_pool\.max_nodes"):
        trainjob.build_trainjob(_with_stage(cfg, nodes=9), "sft", "j", "s3://b/j", "r")


@pytest.fixture
def multi(cfg, tmp_path):
    """A 2-node sft stage, staging on a local folder (what the pods would reach as s3://)."""
    c = _with_stage(cfg, nodes=2, gpus_per_node=8)
    cluster = c.cluster.model_copy(
        update={
            "trainer": c.cluster.trainer.model_copy(
                update={"staging_uri": str(tmp_path / "staging"), "poll_seconds": 0.01}
            )
        }
    )
    c = c.model_copy(update={"cluster": cluster})
    data, init = tmp_path / "data", tmp_path / "init"
    for d, f in ((data, "train.jsonl"), (init, "model.safetensors")):
        d.mkdir()
        (d / f).write_text("x")
    return c, data, init


def _finish(job_name: str, staging_root, *, fail: str | None = None, after: int = 2):
    """A controller that, after `after` reads, completes the job the way train_entry's rank 0
    would (checkpoint + result.json in output/), or fails it with reason `fail`."""
    reads = {"n": 0}

    def controller(obj):
        reads["n"] += 1
        if reads["n"] < after or obj.get("status", {}).get("conditions"):
            return
        if fail:
            obj["status"] = {
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": fail,
                        "message": "pod omni-node-0-0 exited with code 137",
                    }
                ],
                "jobsStatus": [{"name": "node", "failed": 1}],
            }
            return
        store = open_store(f"{staging_root}/{job_name}")
        store.write_bytes("output/model/model.safetensors", b"trained")
        store.write_bytes("output/result.json", json.dumps({"skipped": False, "steps": 3}).encode())
        obj["status"] = {
            "conditions": [{"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "done"}]
        }

    return controller


def test_run_stage_stages_inputs_submits_waits_streams_and_fetches(multi, fake_kube, tmp_path) -> None:
    cfg, data, init = multi
    name = trainjob.trainjob_name("sft", "run-1")
    fake_kube.custom.controller = _finish(name, cfg.cluster.trainer.staging_uri)
    fake_kube.core.pods[f"{name}-node-0-0"] = "Running"
    fake_kube.core.logs[f"{name}-node-0-0"] = ["step 1 loss 2.0", "step 2 loss 1.5"]
    lines: list[str] = []
    out = tmp_path / "out"

    result = trainjob.run_stage(cfg, "sft", data, init, out, "run-1", kube=fake_kube, emit=lines.append)

    assert result == {"skipped": False, "steps": 3}
    assert (out / "model.safetensors").read_bytes() == b"trained"
    staged = open_store(f"{cfg.cluster.trainer.staging_uri}/{name}")
    assert set(staged.list("inputs/")) == {"inputs/data/train.jsonl", "inputs/init/model.safetensors"}
    assert json.loads(staged.read_bytes("config.json"))["stages"]["sft"]["nodes"] == 2
    assert fake_kube.custom.verbs() == ["create"]
    created = fake_kube.custom.calls[[c[0] for c in fake_kube.custom.calls].index("create")][2]
    validate_custom_resource(created)
    assert any("step 2 loss 1.5" in line for line in lines), lines  # rank 0's log was streamed
    assert any("jobset.sigs.k8s.io/jobset-name=" + name in s for s in fake_kube.core.selectors)


def test_failed_job_fails_the_task_with_its_reason(multi, fake_kube, tmp_path) -> None:
    cfg, data, init = multi
    name = trainjob.trainjob_name("sft", "run-2")
    fake_kube.custom.controller = _finish(name, cfg.cluster.trainer.staging_uri, fail="BackoffLimitExceeded")
    with pytest.raises(
        trainjob.TrainJobFailed,
        match=r"BackoffLimitExceeded: pod omni-node-0-0 exited with code 137 "
        r"\(node: 1 failed\)",
    ):
        trainjob.run_stage(cfg, "sft", data, init, tmp_path / "out", "run-2", kube=fake_kube, emit=lambda _: None)


def test_retry_replaces_a_failed_job_and_attaches_to_a_running_one(multi, fake_kube, tmp_path) -> None:
    cfg, data, init = multi
    name = trainjob.trainjob_name("sft", "run-3")
    job = trainjob.build_trainjob(cfg, "sft", name, f"{cfg.cluster.trainer.staging_uri}/{name}", "run-3")
    k8s.apply(fake_kube, job)
    key = next(iter(fake_kube.custom.objects))
    fake_kube.custom.objects[key]["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "X"}]}
    fake_kube.custom.controller = _finish(name, cfg.cluster.trainer.staging_uri, after=3)
    trainjob.run_stage(cfg, "sft", data, init, tmp_path / "a", "run-3", kube=fake_kube, emit=lambda _: None)
    assert fake_kube.custom.verbs() == ["create", "delete", "create"]

    # A retried task while the job still runs: no second job, just wait for it.
    fake_kube.custom.objects[key].pop("status")
    fake_kube.custom.calls.clear()
    fake_kube.custom.controller = _finish(name, cfg.cluster.trainer.staging_uri, after=3)
    lines: list[str] = []
    trainjob.run_stage(cfg, "sft", data, init, tmp_path / "b", "run-3", kube=fake_kube, emit=lines.append)
    assert fake_kube.custom.verbs() == [] and any("attaching" in line for line in lines)


def test_the_dag_launches_a_trainjob_only_for_stages_that_need_one(cfg, tmp_path) -> None:
    """Chosen when the pipeline is built: a 2-node stage compiles to the launcher (CPU pool, no GPU of
    its own); the others to the in-process stage task on the GPU pool. steps.train never dispatches."""
    import yaml

    from pipelines.compile import compile_pipeline

    docs = list(yaml.safe_load_all(compile_pipeline(_with_stage(cfg, nodes=2), tmp_path / "p.yaml").read_text()))
    tasks, executors = docs[0]["root"]["dag"]["tasks"], docs[0]["deploymentSpec"]["executors"]
    placement = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    by_stage = {
        t["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"]: t
        for t in tasks.values()
        if "stage" in t.get("inputs", {}).get("parameters", {})
    }
    launcher = by_stage["sft"]["componentRef"]["name"]
    assert launcher == "comp-train-stage-trainjob"  # KFP numbers further uses of one component: -2, -3...
    assert all(
        re.fullmatch(r"comp-train-stage(-\d+)?", t["componentRef"]["name"]) for s, t in by_stage.items() if s != "sft"
    )
    exec_name = docs[0]["components"][launcher]["executorLabel"]
    assert "accelerator" not in executors[exec_name]["container"].get("resources", {})
    assert executors[exec_name]["container"]["image"] == cfg.cluster.images.ref("cpu")
    assert placement[exec_name]["nodeSelector"]["labels"] == cfg.cluster.cpu_pool.node_selector


def test_train_entry_runs_the_stage_and_uploads_rank0_output(multi, monkeypatch, tmp_path) -> None:
    from components import steps, train_entry

    cfg, data, init = multi
    staging = tmp_path / "job"
    store = open_store(str(staging))
    store.write_bytes("config.json", cfg.to_json().encode())
    store.upload_dir(data, "inputs/data")
    store.upload_dir(init, "inputs/init")
    calls = []

    def fake_train(c, stage, data_dir, init_dir, out_dir, parent, progress=True, **extra):
        calls.append((stage, data_dir, init_dir.name, parent, progress, extra))
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"w")
        return {"steps": 3, "losses": [1.0, 0.5]}

    monkeypatch.setattr(steps, "train", fake_train)
    monkeypatch.setenv("OMNI_TRAINJOB_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train_entry.main(["--staging", str(staging), "--stage", "sft", "--parent-run-id", "p"]) == 0
    # The data set streams from the staging store (what ShardStream opens); only the checkpoint is fetched.
    assert calls == [("sft", store.uri("inputs/data"), "init", "p", True, {"sft_filter_dir": None})]
    assert (tmp_path / "work" / "inputs" / "init").is_dir() and not (tmp_path / "work" / "inputs" / "data").exists()
    assert store.read_bytes("output/model/model.safetensors") == b"w"
    assert json.loads(store.read_bytes("output/result.json"))["steps"] == 3


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_global_rank_0_logs_the_stage_and_saves(multi, monkeypatch, tmp_path, rank) -> None:
    """Inside a TrainJob every rank runs steps.train; one MLflow run and one checkpoint, not N.
    The model, data and DeepSpeed are stand-ins (what each rank trains is tested in tests/model);
    MLflow is real (sqlite)."""
    from types import SimpleNamespace

    from components import steps, tracking
    from model.training.recipe import TrainResult

    cfg, data, init = multi
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"workdir": str(tmp_path / "omni")})})
    uri = steps.mlflow_uri(cfg)
    parent = tracking.start_pipeline_run(uri, cfg.tracking.experiment, "p")
    saved = []

    def save_pretrained(out, _tokenizer):
        out.mkdir(parents=True)
        saved.append(out)

    model = SimpleNamespace(cfg=cfg.model, save_pretrained=save_pretrained)
    trained = []
    monkeypatch.setattr(steps.OmniModel, "from_pretrained", lambda _d, **_k: model)
    monkeypatch.setattr(steps, "load_tokenizer", lambda _d: object())
    monkeypatch.setattr(steps, "OmniProcessor", lambda *_a: object())
    monkeypatch.setattr(steps, "ShardStream", lambda *_a, **_k: SimpleNamespace(num_samples=lambda: 8))
    monkeypatch.setattr(
        steps,
        "train_stage",
        lambda *a, **k: trained.append(a) or TrainResult(losses=[2.0, 1.0], seconds=1.0, trainable_params=5, tokens=10),
    )
    monkeypatch.setenv("RANK", rank)

    out = tmp_path / f"out-rank{rank}"
    result = steps.train(cfg, "sft", data, init, out, parent)

    assert len(trained) == 1 and result["steps"] == 2 and result["final_loss"] == 1.0  # every rank trains
    experiment = tracking.client(uri).get_experiment_by_name(cfg.tracking.experiment).experiment_id
    children = [r for r in tracking.client(uri).search_runs([experiment]) if r.info.run_id != parent]
    if rank == "0":
        assert [r.info.run_name for r in children] == ["train-sft"] and children[0].data.metrics["final_loss"] == 1.0
        assert saved == [out] and (out / "losses.json").exists()
    else:
        assert children == [] and saved == [] and not (out / "losses.json").exists()
