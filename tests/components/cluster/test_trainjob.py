"""Multi-node stages as Kubeflow Trainer TrainJobs: the object (validated against the real CRD),
the launcher task the DAG gets for such a stage, and submit/wait/logs/failure against an in-process
fake of the Kubernetes client (not a real API server)."""

from __future__ import annotations

import copy
import json

import pytest

from components.cluster import kube as k8s
from components.cluster import trainjob
from components.slices import task_slice
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
    job = trainjob.build_trainjob(c, "sft", "omni-sft-abc", "s3://b/trainjobs/omni-sft-abc")
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
    assert t["args"] == ["--staging", "s3://b/trainjobs/omni-sft-abc", "--stage", "sft",
                         "--checkpoints", "/checkpoints/omni-sft-abc"]
    assert t["numNodes"] == 2 and t["numProcPerNode"] == 8
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert {e["name"] for e in t["env"]} == {"S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                             *cfg.cluster.gpu_pool.node_pool.nccl_env}
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"
    ]["spec"]
    assert pod["nodeSelector"] == cfg.cluster.gpu_pool.node_selector
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"},
                                                    {"name": "checkpoints", "mountPath": "/checkpoints"}]

    typo = copy.deepcopy(job)
    typo["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(ValueError, match=r"spec\.trainer\.numNode: unknown field"):
        validate_custom_resource(typo)


def test_impossible_stage_is_refused_with_the_field_to_fix(cfg) -> None:
    with pytest.raises(ValueError, match=r"stages\.sft\.gpus_per_node=16 .* 8 GPUs"):
        trainjob.build_trainjob(_with_stage(cfg, nodes=2, gpus_per_node=16), "sft", "j", "s3://b/j")
    with pytest.raises(ValueError, match=r"stages\.sft\.nodes=9 exceeds cluster\.gpu_pool\.node_pool\.max_nodes"):
        trainjob.build_trainjob(_with_stage(cfg, nodes=9), "sft", "j", "s3://b/j")


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
    job = trainjob.build_trainjob(cfg, "sft", name, f"{cfg.cluster.trainer.staging_uri}/{name}")
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
    # Each stage's task (and component) is named after the stage; the launcher runs train_stage_trainjob.
    assert {s: t["componentRef"]["name"] for s, t in by_stage.items()} == {
        s: f"comp-{s.replace('_', '-')}" for s in by_stage}
    exec_name = docs[0]["components"][by_stage["sft"]["componentRef"]["name"]]["executorLabel"]
    assert "train_stage_trainjob" in " ".join(executors[exec_name]["container"]["command"])
    assert "train_stage_trainjob" not in " ".join(
        executors[docs[0]["components"][by_stage["audio"]["componentRef"]["name"]]["executorLabel"]]["container"]["command"])
    assert "accelerator" not in executors[exec_name]["container"].get("resources", {})
    assert executors[exec_name]["container"]["image"] == cfg.cluster.images.ref("cpu")
    assert placement[exec_name]["nodeSelector"]["labels"] == cfg.cluster.cpu_pool.node_selector


def test_train_entry_runs_the_stage_and_uploads_rank0_output(multi, monkeypatch, tmp_path) -> None:
    from components import train_entry
    from components.steps import training as steps

    cfg, data, init = multi
    staging = tmp_path / "job"
    store = open_store(str(staging))
    store.write_bytes("config.json", task_slice(cfg, "stage-trainjob", "sft").encode())  # what run_stage stages
    store.upload_dir(data, "inputs/data")
    store.upload_dir(init, "inputs/init")
    calls = []

    def fake_train(c, stage, data_dir, init_dir, out_dir, progress=True, **extra):
        calls.append((stage, data_dir, init_dir.name, progress, extra))
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"w")
        return {"steps": 3, "losses": [1.0, 0.5]}

    monkeypatch.setattr(steps, "train", fake_train)
    monkeypatch.setenv("OMNI_TRAINJOB_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ckpt = tmp_path / "checkpoints" / "job"
    assert train_entry.main(["--staging", str(staging), "--stage", "sft",
                             "--checkpoints", str(ckpt)]) == 0
    # The data set streams from the staging store (what ShardStream opens); only the checkpoint is fetched.
    # The resumable state goes to the shared checkpoint volume.
    assert calls == [("sft", store.uri("inputs/data"), "init", True,
                      {"sft_filter_dir": None, "checkpoint_dir": ckpt})]
    assert (tmp_path / "work" / "inputs" / "init").is_dir() and not (tmp_path / "work" / "inputs" / "data").exists()
    assert store.read_bytes("output/model/model.safetensors") == b"w"
    assert json.loads(store.read_bytes("output/result.json"))["steps"] == 3


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_global_rank_0_records_the_stage_and_saves(multi, monkeypatch, tmp_path, rank) -> None:
    """Inside a TrainJob every rank runs steps.train; one record (what register logs to MLflow) and one
    checkpoint, not N. The model, data and DeepSpeed are stand-ins (what each rank trains is tested in
    tests/model)."""
    from types import SimpleNamespace

    from components.registry.records import read_record
    from components.steps import training as steps
    from model.training.recipe import TrainResult

    cfg, data, init = multi
    saved = []

    def save_pretrained(out, _tokenizer):
        out.mkdir(parents=True)
        saved.append(out)

    model = SimpleNamespace(cfg=cfg.model, save_pretrained=save_pretrained)
    trained = []
    monkeypatch.setattr(steps, "build_for_stage", lambda _d, _stage: model)
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
    result = steps.train(cfg, "sft", data, init, out)

    assert len(trained) == 1 and result["steps"] == 2 and result["final_loss"] == 1.0  # every rank trains
    if rank == "0":
        record = read_record(out)
        assert record["name"] == "train-sft" and record["metrics"]["final_loss"] == 1.0
        assert record["history"]["loss"] == [2.0, 1.0] and (out / "report.html").is_file()
        assert saved == [out] and (out / "losses.json").exists()
    else:
        assert read_record(out) is None and saved == [] and not (out / "losses.json").exists()
