"""The checked-in YAML is what clusters run: it must be what the code compiles today."""

import json

import yaml

from components.config import load_config
from pipelines.cli import DEFAULT_COMPILED
from pipelines.compile import compile_pipeline


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


def test_run_parameters_are_typed_and_described(tmp_path):
    """What the Kubeflow UI's run form shows: the parameters a person changes per run, with types
    and descriptions; the compiled config is only the default of config_json."""
    cfg = load_config()
    spec = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path / "p.yaml").read_text()))[0]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in params.items()} == {
        "data_uri": "STRING", "overrides": "LIST", "llm": "STRING", "vision": "STRING", "audio": "STRING",
        "registered_model": "STRING", "experiment": "STRING", "config_json": "STRING"}
    assert all(len(v.get("description", "")) > 20 for v in params.values()), params
    assert "data_uri" not in {k for k, v in params.items() if v.get("isOptional")}  # the one a run must give
    assert params["overrides"]["defaultValue"] == [] and params["registered_model"]["defaultValue"] == "omni-tiny"
    assert json.loads(params["config_json"]["defaultValue"]) == json.loads(cfg.to_json())
    outputs = spec["root"]["outputDefinitions"]["parameters"]
    assert set(outputs) == {"version", "verdict", "evaluation"}


def test_kfp_run_submit_arguments_parse_to_the_compiled_types(tmp_path):
    """`kfp run submit -f pipeline.yaml data_uri=... overrides='["stages.sft.lr=1e-5"]'` (the README's
    example): the kfp CLI's own parser turns each argument into a value of the type the spec declares,
    and the first task's resolver accepts the overrides."""
    from kfp.cli.utils.parsing import parse_parameter_value

    from components.run_params import resolve_run

    cfg = load_config()
    spec = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path / "p.yaml").read_text()))[0]
    params = spec["root"]["inputDefinitions"]["parameters"]
    types = {"STRING": str, "LIST": list}
    argv = ["data_uri=s3://omni-data/records/", 'overrides=["stages.sft.lr=1e-5", "stages.sft.steps=20"]',
            "llm=s3://models/Qwen2.5-7B-Instruct", "experiment=ablation-lr"]
    args = {k: parse_parameter_value(v) for k, v in (a.split("=", 1) for a in argv)}
    for key, value in args.items():
        assert isinstance(value, types[params[key]["parameterType"]]), (key, value)
    run = resolve_run(params["config_json"]["defaultValue"], args["overrides"], llm=args["llm"],
                      experiment=args["experiment"])
    assert run.stages["sft"].lr == 1e-5 and run.stages["sft"].steps == 20 and run.tracking.experiment == "ablation-lr"
