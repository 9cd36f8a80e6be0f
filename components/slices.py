"""What each pipeline task receives of the resolved config: only the sections its step reads.

KFP keys its cache on a task's inputs. Handing every task the whole config meant that changing
SFT's learning rate re-ran data prep and all seven stages; with slices, a task's inputs change only
when what it depends on does (`tests/pipelines/test_cache_keys.py` proves it on the compiled DAG).
This table is the one place that says which task reads what; a step that reads outside its slice
finds None there and fails (components.config.TaskConfig).
"""

from __future__ import annotations

import json

from components.config import OmniConfig, merge_into, parse_task_config, sft_filter_tasks
from components.stages import FILTERED_STAGE, STAGES, TASK_CONFIGS

# Dotted paths into the resolved config; "{stage}" is the task's stage. run.workdir is where a
# machine keeps its caches (a deployment setting, not a run's).
SLICES: dict[str, tuple[str, ...]] = {
    "data-prep": ("data", "model"),
    "init-model": ("data.seed", "model"),
    "stage": ("data", "model", "run.skip_stages", "stages.{stage}"),
    "stage-trainjob": ("data", "model", "run.skip_stages", "stages.{stage}", "cluster"),
    "sft-loss-filter": ("model", "run.skip_stages", "sft_filter"),  # + the sft stage's data_tasks, see task_slice
    "evaluate": ("model", "evaluation", "benchmark", "run.workdir"),
}


def _take(tree: dict, path: str) -> dict:
    """The nested dict holding only `path` of `tree` ({} if the tree lacks it)."""
    head, _, rest = path.partition(".")
    if head not in tree:
        return {}
    return {head: _take(tree[head], rest) if rest else tree[head]}


def task_slice(cfg: OmniConfig, task: str, stage: str | None = None) -> str:
    """The JSON a task gets (sorted keys: the same config gives the same string, so the same cache key)."""
    tree = cfg.model_dump(mode="json")
    out: dict = {}
    for path in SLICES[task]:
        merge_into(out, _take(tree, path.format(stage=stage)))
    if "skip_stages" in out.get("run", {}):  # whether its own stage is skipped: skipping video re-runs video only
        own = FILTERED_STAGE if task == "sft-loss-filter" else stage
        out["run"]["skip_stages"] = [s for s in out["run"]["skip_stages"] if s == own]
    if task == "sft-loss-filter":
        out["sft_filter"]["data_tasks"] = sft_filter_tasks(cfg)  # what it scores, not how sft trains
    return json.dumps(parse_task_config(out).model_dump(mode="json", exclude_none=True), sort_keys=True)


def all_slices(cfg: OmniConfig) -> dict[str, str]:
    """Every slice the DAG hands out, by output name of the resolve-config task ("" for a stage the
    config leaves out)."""
    from components.cluster.trainjob import needs_trainjob

    out = {"prep": task_slice(cfg, "data-prep"), "init": task_slice(cfg, "init-model"),
           "sft_filter": task_slice(cfg, "sft-loss-filter"), "evaluate": task_slice(cfg, "evaluate")}
    for stage in STAGES:
        launcher = "stage-trainjob" if stage in cfg.stages and needs_trainjob(cfg, stage) else "stage"
        out[stage] = task_slice(cfg, launcher, stage) if stage in cfg.stages else ""
    return out


def task_configs(cfg: OmniConfig) -> tuple[str, ...]:
    """The resolve-config task's outputs, in `stages.TASK_CONFIGS` order: the whole config, then the slices."""
    out = {"config": cfg.to_json(), **all_slices(cfg)}
    return tuple(out[name] for name in TASK_CONFIGS)
