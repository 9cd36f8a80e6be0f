"""A run's parameters applied to the compiled config: what a person changes per run in the Kubeflow
UI or `kfp run submit`, without editing JSON.

    resolve_run(compiled_json, ["stages.sft.lr=1e-5"], llm="s3://models/qwen", experiment="ablation")

`overrides` are Hydra overrides, parsed by Hydra's own override parser (as `omni` commands parse
theirs): `key=value`, `+key=value` and `++key=value` set a key, `~key` removes one; values are
Hydra's (numbers, booleans, `[a,b]` lists, `{k: v}` maps, quoted strings). Config groups
(`model=omni-7b`, `recipe=paper`) and sweeps are choices made when the pipeline is compiled. The
result is validated by the same schema as every command, so a bad key fails the run's first task
naming the key.
"""

from __future__ import annotations

import json

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from components.config import ConfigError, OmniConfig, merge_into, parse_config

# The named run parameters and the config keys they set (applied before `overrides`).
NAMED = {"llm": "model.init.llm", "vision": "model.init.vision", "audio": "model.init.audio",
         "registered_model": "tracking.registered_model", "experiment": "tracking.experiment"}


def _one(tree: dict, override: str, parser: OverridesParser) -> None:
    try:
        (parsed,) = parser.parse_overrides([override])
    except HydraException as err:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. stages.sft.lr=1e-5 ({err})") from None
    key = parsed.key_or_group
    if parsed.is_sweep_override():
        raise ConfigError(f"override {override!r}: a sweep is several runs; give one value per run")
    if parsed.is_delete():
        parent, _, leaf = key.rpartition(".")
        node = _walk(tree, parent, override) if parent else tree
        node.pop(leaf, None)
        return
    if "." not in key and isinstance(tree.get(key), dict):
        raise ConfigError(f"override {override!r}: {key!r} is a config group, chosen when the pipeline is compiled "
                          f"(`omni pipeline compile {override}`); set its fields here, e.g. {key}.<field>=...")
    merge_into(tree, _nested(key, parsed.value()))


def _nested(dotted: str, value) -> dict:
    """{"a": {"b": value}} for "a.b"."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


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
    for name, value in named.items():
        if value:
            merge_into(tree, _nested(NAMED[name], value))
    parser = OverridesParser.create()
    for override in overrides or []:
        if not isinstance(override, str):
            raise ConfigError(f"overrides: {override!r} is not a string; give a list of key=value strings")
        _one(tree, override, parser)
    resolved = parse_config(tree)
    if changed := shape_changes(parse_config(compiled), resolved):
        raise ConfigError(f"this run's parameters change the pipeline's shape ({'; '.join(changed)}), which is "
                          "fixed when it is compiled: recompile with them (`omni pipeline compile KEY=VALUE ...`)")
    return resolved


def dag_shape(cfg: OmniConfig) -> dict:
    """What pipelines/dag.build_pipeline reads of the config besides defaults: the tasks there are,
    how each stage is launched, and where tasks are placed."""
    from components.cluster.trainjob import needs_trainjob

    return {"stages": sorted(cfg.stages), "evaluation.baseline": cfg.evaluation.baseline,
            "trainjob stages": sorted(s for s in cfg.stages if needs_trainjob(cfg, s)),
            "cluster": cfg.cluster.model_dump(mode="json")}


def shape_changes(compiled: OmniConfig, resolved: OmniConfig) -> list[str]:
    before, after = dag_shape(compiled), dag_shape(resolved)
    return [f"{key}: {before[key]} -> {after[key]}" if key != "cluster" else "cluster settings"
            for key in before if before[key] != after[key]]
