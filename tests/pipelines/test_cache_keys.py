"""KFP caches a task when its inputs equal an earlier run's. On the compiled DAG: no cached task takes
an input from an uncached task or a per-run placeholder, and two runs that differ only in SFT's
learning rate give every task up to and including the SFT loss filter identical inputs (so only sft
and what follows it run again)."""

from __future__ import annotations

import json

import pytest
import yaml

from components.config import load_config
from components.run_params import resolve_run
from components.slices import all_slices
from pipelines.compile import compile_pipeline


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cfg = load_config()
    spec = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path_factory.mktemp("p") / "p.yaml").read_text()))[0]
    return cfg, spec


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of the DAG, the ones inside the gate's branches included."""
    found, dags = {}, [spec["root"]["dag"]]
    while dags:
        for name, task in dags.pop()["tasks"].items():
            found[name] = task
            sub = spec["components"][task["componentRef"]["name"]].get("dag")
            if sub:
                dags.append(sub)
    return found


def _cached(task: dict) -> bool:
    return task.get("cachingOptions", {}).get("enableCache", False)


def test_no_cached_task_depends_on_an_uncached_one_or_on_the_run(compiled):
    _, spec = compiled
    tasks = _tasks(spec)
    cached = {n for n, t in tasks.items() if _cached(t)}
    assert {"resolve-config", "data-prep", "init-model", "sft", "evaluate", "export-triton"} <= cached
    assert {"start-tracking", "register", "gate", "promote", "keep-champion"}.isdisjoint(cached)
    for name in cached:
        inputs = tasks[name].get("inputs", {})
        for key, value in inputs.get("parameters", {}).items():
            if "taskOutputParameter" in value:
                producer = value["taskOutputParameter"]["producerTask"]
                assert producer in cached, f"{name}.{key} comes from uncached {producer}"
            constant = json.dumps(value.get("runtimeValue", {}))
            assert "{{$" not in constant, f"{name}.{key} is a per-run placeholder: {constant}"
        for key, value in inputs.get("artifacts", {}).items():
            producer = value["taskOutputArtifact"]["producerTask"]
            assert producer in cached, f"{name}.{key} comes from uncached {producer}"


def _slice_inputs(tasks: dict, slices: dict) -> dict[str, str]:
    """Task -> the config slice it receives from resolve-config."""
    out = {}
    for name, task in tasks.items():
        param = task.get("inputs", {}).get("parameters", {}).get("config_json", {})
        source = param.get("taskOutputParameter", {})
        if source.get("producerTask") == "resolve-config" and source["outputParameterKey"] in slices:
            out[name] = slices[source["outputParameterKey"]]
    return out


def _upstream(tasks: dict, name: str) -> set[str]:
    """`name` and every task it depends on."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += tasks[current].get("dependentTasks", [])
    return seen


def test_an_sft_only_change_leaves_every_earlier_input_unchanged(compiled):
    cfg, spec = compiled
    tasks = _tasks(spec)
    base = _slice_inputs(tasks, all_slices(resolve_run(cfg.to_json(), [])))
    changed = _slice_inputs(tasks, all_slices(resolve_run(cfg.to_json(), ["stages.sft.lr=1e-5"])))
    before_sft = _upstream(tasks, "sft-loss-filter") - {"resolve-config"}
    assert {"data-prep", "init-model", "image-1", "omni-align", "sft-loss-filter"} <= before_sft
    for name in before_sft:
        assert base.get(name) == changed.get(name), f"{name} would run again"
        # Its artifacts come from tasks with unchanged inputs too (they are all upstream of it).
        for artifact in tasks[name].get("inputs", {}).get("artifacts", {}).values():
            assert artifact["taskOutputArtifact"]["producerTask"] in before_sft
    assert base["sft"] != changed["sft"] and json.loads(changed["sft"])["stages"]["sft"]["lr"] == 1e-5


def test_a_bad_override_fails_naming_the_key(compiled):
    from components.config import ConfigError

    cfg, _ = compiled
    with pytest.raises(ConfigError, match=r"stages\.sft\.lrr: Extra inputs are not permitted"):
        resolve_run(cfg.to_json(), ["stages.sft.lrr=1e-5"])
    with pytest.raises(ConfigError, match=r"stages\.sft\.lr: Input should be greater than 0"):
        resolve_run(cfg.to_json(), ["stages.sft.lr=-1"])
    with pytest.raises(ConfigError, match="config group, chosen when the pipeline is compiled"):
        resolve_run(cfg.to_json(), ["model=omni-7b"])
    with pytest.raises(ConfigError, match=r"'stages\.sft\.lr': expected key=value"):  # Hydra's own parser
        resolve_run(cfg.to_json(), ["stages.sft.lr"])
    with pytest.raises(ConfigError, match="a sweep is several runs"):
        resolve_run(cfg.to_json(), ["stages.sft.lr=1e-5,2e-5"])
    with pytest.raises(ConfigError, match=r"overrides: 3 is not a string"):
        resolve_run(cfg.to_json(), [3])
    run = resolve_run(cfg.to_json(), ["+stages.sft.lora.rank=4", "run.skip_stages=[video]"])
    assert run.stages["sft"].lora.rank == 4 and run.run.skip_stages == ["video"]
    # What the compiled DAG fixed (its tasks, how a stage is launched, task placement) needs a recompile.
    for shape in ("~stages.video", "stages.sft.nodes=2", "evaluation.baseline=none", "cluster.retries=0"):
        with pytest.raises(ConfigError, match=r"change the pipeline's shape .* recompile"):
            resolve_run(cfg.to_json(), [shape])
    named = resolve_run(cfg.to_json(), [], llm="s3://models/qwen", experiment="ablation")
    assert named.model.init.llm == "s3://models/qwen" and named.tracking.experiment == "ablation"


def test_skipping_one_stage_changes_only_that_stage_s_inputs(compiled):
    cfg, _ = compiled
    base = all_slices(resolve_run(cfg.to_json(), []))
    skipped = all_slices(resolve_run(cfg.to_json(), ["run.skip_stages=[video]"]))
    assert {name for name in base if base[name] != skipped[name]} == {"video"}
