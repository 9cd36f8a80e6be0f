"""A run's parameters applied to the compiled config: what a person changes per run in the Kubeflow
UI or `kfp run submit`, without editing JSON.

    resolve_run(compiled_json, ["stages.sft.lr=1e-5"], llm="s3://models/qwen", experiment="ablation")

`overrides` are Hydra-style `key=value` strings (`+key=value` and `++key=value` mean the same here,
`~key` removes a key), values parsed as Hydra parses them (numbers, booleans, `[a,b]` lists,
`{k: v}` maps, quoted strings). Config groups (`model=omni-7b`, `recipe=paper`) are choices made
when the pipeline is compiled. The result is validated by the same schema as every command, so a bad
key fails the run's first task naming the key.
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.config import ConfigError, OmniConfig, merge_into, parse_config

# The named run parameters and the config keys they set (applied before `overrides`).
NAMED = {"llm": "model.init.llm", "vision": "model.init.vision", "audio": "model.init.audio",
         "registered_model": "tracking.registered_model", "experiment": "tracking.experiment"}


def _one(tree: dict, override: str) -> None:
    key, sep, value = override.lstrip("+").partition("=")
    if override.startswith("~"):
        parent, _, leaf = override[1:].partition("=")[0].rpartition(".")
        node = _walk(tree, parent, override) if parent else tree
        node.pop(leaf, None)
        return
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. stages.sft.lr=1e-5")
    if "." not in key and isinstance(tree.get(key), dict):
        raise ConfigError(f"override {override!r}: {key!r} is a config group, chosen when the pipeline is compiled "
                          f"(`omni pipeline compile {key}={value}`); set its fields here, e.g. {key}.<field>=...")
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={value}"]), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {override!r}: {err}") from None
    merge_into(tree, parsed)


def _walk(tree: dict, dotted: str, override: str) -> dict:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"override {override!r}: no key {dotted!r} in the config")
        node = node[part]
    return node


def resolve_run(compiled: str | dict, overrides: list[str] | None = None, **named: str) -> OmniConfig:
    """The run's config: the compiled one, the non-empty named parameters (NAMED), then `overrides`."""
    tree = json.loads(compiled) if isinstance(compiled, str) else json.loads(json.dumps(compiled))
    if unknown := sorted(set(named) - set(NAMED)):
        raise ConfigError(f"unknown run parameter(s) {unknown}; known: {', '.join(NAMED)}")
    steps = [f"{NAMED[k]}={json.dumps(v)}" for k, v in named.items() if v]
    for override in [*steps, *(overrides or [])]:
        if not isinstance(override, str):
            raise ConfigError(f"overrides: {override!r} is not a string; give a list of key=value strings")
        _one(tree, override)
    resolved = parse_config(tree)
    if changed := shape_changes(parse_config(compiled), resolved):
        raise ConfigError(f"this run's parameters change the pipeline's shape ({'; '.join(changed)}), which is "
                          "fixed when it is compiled: recompile with them (`omni pipeline compile KEY=VALUE ...`)")
    return resolved


def dag_shape(cfg: OmniConfig) -> dict:
    """What pipelines/dag.build_pipeline reads of the config besides defaults: the tasks there are,
    how each stage is launched, and where tasks are placed."""
    from components.trainjob import needs_trainjob

    return {"stages": sorted(cfg.stages), "evaluation.baseline": cfg.evaluation.baseline,
            "trainjob stages": sorted(s for s in cfg.stages if needs_trainjob(cfg, s)),
            "cluster": cfg.cluster.model_dump(mode="json")}


def shape_changes(compiled: OmniConfig, resolved: OmniConfig) -> list[str]:
    before, after = dag_shape(compiled), dag_shape(resolved)
    return [f"{key}: {before[key]} -> {after[key]}" if key != "cluster" else "cluster settings"
            for key in before if before[key] != after[key]]
