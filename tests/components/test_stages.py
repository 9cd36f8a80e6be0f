"""The stage registry (components.stages) against what spells the stages out again: the KFP
signatures of resolve-config and register, and the compiled DAG's tasks."""

import inspect

import pytest
import yaml

from components.pipeline_components import register, resolve_config
from components.stages import FILTERED_STAGE, RECORD_INPUTS, STAGES, TASK_CONFIGS, task_name
from pipelines.cli import DEFAULT_COMPILED


@pytest.fixture(scope="module")
def spec() -> dict:
    return next(yaml.safe_load_all(DEFAULT_COMPILED.read_text()))


def test_resolve_config_hands_out_the_registry_s_task_configs():
    assert resolve_config.__annotations__["return"]._fields == TASK_CONFIGS
    assert set(STAGES) <= set(TASK_CONFIGS) and FILTERED_STAGE in STAGES


def test_register_takes_every_record_input_and_no_other_artifact():
    params = inspect.signature(register).parameters
    artifacts = {name for name, p in params.items() if "Input" in str(p.annotation)} - {"model"}
    assert artifacts == set(RECORD_INPUTS)
    assert set(RECORD_INPUTS.values()) >= {task_name(s) for s in STAGES}


def test_the_compiled_dag_names_its_tasks_and_outputs_from_the_registry(spec):
    tasks = spec["root"]["dag"]["tasks"]
    resolve = spec["components"][tasks["resolve-config"]["componentRef"]["name"]]
    assert list(resolve["outputDefinitions"]["parameters"]) == sorted(TASK_CONFIGS)
    assert {task_name(s) for s in STAGES} <= set(tasks)
    assert set(tasks["register"]["inputs"]["artifacts"]) == set(RECORD_INPUTS) | {"model"}
