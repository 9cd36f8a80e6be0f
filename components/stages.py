"""The training stages and the pipeline tasks that carry their facts: the one list the config schema
(`OmniConfig.ordered_stages`), the task slices (`components.slices`), the DAG (`pipelines/dag.py`) and
the KFP components (`components.pipeline_components`) read.

Two KFP signatures spell the names out again, because KFP runs a component from its function's
source alone and reads its inputs and outputs from that signature: `resolve_config`'s outputs
(`TASK_CONFIGS`) and `register`'s inputs (`RECORD_INPUTS`). `tests/components/test_stages.py`
holds both to this module.
"""

from __future__ import annotations

# Config keys (`stages.<key>`, conf/stage/<key>.yaml), in the order the DAG trains them.
STAGES = ("image_1", "image_2", "image_3", "video", "audio", "omni_align", "sft")

# The stage the SFT loss filter runs before: it scores this stage's data with the checkpoint the
# stage starts from, and the stage leaves out what it dropped.
FILTERED_STAGE = "sft"


def task_name(stage: str) -> str:
    """A stage's task in the DAG, the KFP UI and its step record (`image_1` -> `image-1`)."""
    return stage.replace("_", "-")


# What resolve-config hands out, by output name: the whole resolved config, then each task's slice
# (components.slices.SLICES says which task reads what); a stage's slice is named for the stage.
TASK_CONFIGS = ("config", "prep", "init", *STAGES, "sft_filter", "evaluate")

# register's inputs that carry a step record (components.registry.records), by parameter name ->
# the task that wrote it (its child run's name in MLflow and its lineage tag on the version).
RECORD_INPUTS = {"dataset": "data-prep", "results": "evaluate", "results_before": "evaluate-initial",
                 "filtered": "sft-loss-filter", **{s: task_name(s) for s in STAGES}}
