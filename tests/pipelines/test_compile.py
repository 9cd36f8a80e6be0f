"""The checked-in YAML is what clusters run: it must be what the code compiles today."""

import yaml

from pipelines.cli import DEFAULT_COMPILED
from pipelines.compile import compile_pipeline
from pipelines.config import load_config


def test_checked_in_pipeline_yaml_is_up_to_date(tmp_path):
    fresh = compile_pipeline(load_config(), tmp_path / "p.yaml").read_text()
    assert DEFAULT_COMPILED.exists(), "run `omni pipeline compile` and commit pipelines/compiled/omni_pipeline.yaml"
    assert fresh == DEFAULT_COMPILED.read_text(), "stale: run `omni pipeline compile` and commit the result"


def test_gpu_stages_carry_placement_and_cpu_steps_do_not(tmp_path):
    cfg = load_config()
    docs = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path / "p.yaml").read_text()))
    spec, platform = docs[0], docs[1]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    containers = spec["deploymentSpec"]["executors"]
    train = [f"exec-{s.replace('_', '-')}" for s in cfg.stages]  # each stage's executor is named after it
    assert set(train) <= set(containers)
    for name in train:
        res = containers[name]["container"]["resources"]
        assert res["accelerator"]["resourceCount"] == str(cfg.cluster.gpu_pool.accelerator_limit)
        assert res["accelerator"]["resourceType"] == cfg.cluster.gpu_pool.accelerator_type
        k8s = executors[name]
        assert k8s["nodeSelector"]["labels"] == cfg.cluster.gpu_pool.node_selector
        assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        assert containers[name]["container"]["image"] == cfg.cluster.images.ref("gpu")
    gate = containers["exec-gate"]
    assert "accelerator" not in gate["container"].get("resources", {})
    assert executors["exec-gate"]["nodeSelector"]["labels"] == cfg.cluster.cpu_pool.node_selector
    assert gate["container"]["image"] == cfg.cluster.images.ref("cpu")


def test_dag_order_and_gate(tmp_path):
    docs = list(yaml.safe_load_all(compile_pipeline(load_config(), tmp_path / "p.yaml").read_text()))
    tasks = docs[0]["root"]["dag"]["tasks"]
    order = ["image-1", "image-2", "image-3", "video", "audio", "omni-align", "sft"]  # tasks named after stages
    for before, after in zip(order, order[1:], strict=False):
        assert before in tasks[after]["dependentTasks"]
    assert tasks["image-1"]["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"] == "image_1"
    assert tasks["sft"]["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"] == "sft"
    # The loss filter scores with the omni-align checkpoint and feeds the sft stage.
    producer = tasks["sft-loss-filter"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"]
    assert producer == "omni-align"
    assert tasks["sft"]["inputs"]["artifacts"]["sft_filter"]["taskOutputArtifact"]["producerTask"] == "sft-loss-filter"
    assert "condition-branches-1" in tasks
    # Every stage config comes from the run's first task; evaluation compares with the initial checkpoint.
    assert tasks["data-prep"]["inputs"]["parameters"]["config_json"]["taskOutputParameter"] == {
        "outputParameterKey": "prep", "producerTask": "resolve-config"}
    assert tasks["evaluate"]["inputs"]["artifacts"]["baseline"]["taskOutputArtifact"]["producerTask"] == \
        "evaluate-initial"
