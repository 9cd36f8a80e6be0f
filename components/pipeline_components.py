"""The KFP components: lightweight, typed adapters from artifacts to the steps (`components.steps`),
and the KFP side of their outputs (`log_metrics`, `stage_outputs`). The one module of components/
that imports kfp.

KFP serialises each function's source into the task, so imports live inside the bodies and the
container image (or, locally, the current interpreter) must have this project installed; for the
same reason two signatures spell out the stages (components.stages says which, and a test holds
them to it). `make_components` binds them to the configured images.

No `from __future__ import annotations` here or in pipelines/dag.py: KFP reads the parameter types
at decoration time.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

STAGE_METRICS = ("steps", "first_loss", "final_loss", "tokens_per_second")


def log_metrics(metrics: Metrics, values: dict) -> None:
    """`values` into a KFP Metrics output, and as JSON into the artifact's file: kfp.local reuses a
    cached task only if every output file exists, and log_metric alone writes none (the values
    travel in the executor's output)."""
    for key, value in values.items():
        metrics.log_metric(key, value)
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text(json.dumps(values, indent=2, sort_keys=True))


def stage_outputs(stage: str, result: dict, out_dir: Path, metadata: dict, metrics: Metrics,
                  report_path: Path) -> None:
    """A stage task's KFP outputs from its result: the model's metadata, the Metrics, the HTML report."""
    from components.reports.html import write_report

    metadata["stage"] = stage
    log_metrics(metrics, {key: result[key] for key in STAGE_METRICS if key in result})
    if (out_dir / "report.html").is_file() and not result.get("skipped"):
        shutil.copy(out_dir / "report.html", report_path)
    else:
        write_report(report_path, f"<html><body><p>Stage {stage} was skipped (run.skip_stages): its input "
                                  "checkpoint was passed on.</p></body></html>")


def resolve_config(config_json: str, overrides: list, llm: str, vision: str, audio: str, registered_model: str,
                   experiment: str) -> NamedTuple("TaskConfigs", [("config", str), ("prep", str), ("init", str),
                                                                 ("image_1", str), ("image_2", str), ("image_3", str),
                                                                 ("video", str), ("audio", str), ("omni_align", str),
                                                                 ("sft", str), ("sft_filter", str), ("evaluate", str)]):
    """The run's config: the compiled one with this run's parameters and overrides, validated (a bad
    key fails here, naming it), and the slice each task depends on (components.slices); the outputs
    are components.stages.TASK_CONFIGS."""
    from components.run_params import resolve_run
    from components.slices import task_configs

    return task_configs(resolve_run(config_json, overrides, llm=llm, vision=vision, audio=audio,
                                    registered_model=registered_model, experiment=experiment))


def start_tracking(config_json: str, pipeline_run: str) -> str:
    """Open the MLflow parent run of this pipeline run."""
    from components.config import parse_config
    from components.steps.lifecycle import start_tracking as step

    return step(parse_config(config_json), pipeline_run)


def data_prep(config_json: str, data_uri: str, dataset: Output[Dataset], metrics: Output[Metrics],
              report: Output[HTML]) -> str:
    """Validate, normalise, deduplicate, split and shard the records (`data_uri`: comma-separated
    JSONL files or folders, local or s3://); returns the manifest hash."""
    import shutil
    from pathlib import Path

    from components.config import parse_task_config
    from components.pipeline_components import log_metrics
    from components.steps.data import data_prep as step
    from components.steps.data import data_prep_metrics

    manifest = step(parse_task_config(config_json), data_uri, Path(dataset.path))
    log_metrics(metrics, data_prep_metrics(manifest))
    dataset.metadata.update({k: manifest[k] for k in ("records_out", "splits", "sha256", "format")})
    shutil.copy(Path(dataset.path) / "report.html", report.path)
    return manifest["sha256"]


def init_model(config_json: str, dataset: Input[Dataset], model: Output[Model]) -> None:
    """The starting checkpoint: composed from model.init's Hugging Face parts (fresh weights where a
    part is not given) with data prep's tokenizer, or the omni checkpoint model.pretrained."""
    from pathlib import Path

    from components.config import parse_task_config
    from components.steps.training import init_model as step

    step(parse_task_config(config_json), Path(dataset.path), Path(model.path))


def train_stage(config_json: str, stage: str, dataset: Input[Dataset], init_model: Input[Model],
                model: Output[Model], metrics: Output[Metrics], report: Output[HTML],
                sft_filter: Input[Dataset] = None) -> None:
    """One training stage (trainable modules, lr, data from conf/stage/<stage>.yaml): its loss
    curve in the report, steps/losses/tokens per second as metrics; with `sft_filter`, the samples
    the loss filter dropped are left out."""
    from pathlib import Path

    from components.config import parse_task_config
    from components.pipeline_components import stage_outputs
    from components.steps.training import train as step

    out = Path(model.path)
    result = step(parse_task_config(config_json), stage, Path(dataset.path), Path(init_model.path), out,
                  sft_filter_dir=Path(sft_filter.path) if sft_filter is not None else None)
    stage_outputs(stage, result, out, model.metadata, metrics, Path(report.path))


def train_stage_trainjob(config_json: str, stage: str, dataset: Input[Dataset], init_model: Input[Model],
                         model: Output[Model], metrics: Output[Metrics], report: Output[HTML],
                         sft_filter: Input[Dataset] = None) -> None:
    """Launcher of a multi-node stage: stage the inputs, run the stage as a Kubeflow Trainer TrainJob
    (every rank runs the same training entry as `train_stage`), stream rank 0's log, fetch the checkpoint."""
    from pathlib import Path

    from components.cluster.trainjob import run_stage
    from components.config import parse_task_config
    from components.pipeline_components import stage_outputs

    extra = {"sft_filter": Path(sft_filter.path) if sft_filter is not None else None}
    out = Path(model.path)
    key = f"{dataset.uri}|{init_model.uri}|{config_json}"  # the same inputs find the same job (a retry re-attaches)
    result = run_stage(parse_task_config(config_json), stage, Path(dataset.path), Path(init_model.path), out, key,
                       extra_dirs=extra)
    stage_outputs(stage, result, out, model.metadata, metrics, Path(report.path))


def sft_filter(config_json: str, dataset: Input[Dataset], model: Input[Model], filtered: Output[Dataset],
               metrics: Output[Metrics], report: Output[HTML]) -> None:
    """Loss-based SFT filter: per-sample loss under the pre-SFT model, Gaussian fit per task, drop
    outside mean +- k std; the dropped ids go to the sft stage, the report to the KFP UI."""
    import shutil
    from pathlib import Path

    from components.config import parse_task_config
    from components.pipeline_components import log_metrics
    from components.steps.training import sft_filter as step

    summary = step(parse_task_config(config_json), Path(dataset.path), Path(model.path), Path(filtered.path))
    log_metrics(metrics, {"kept": summary["kept"], "dropped": len(summary["dropped"])} if summary["enabled"] else {})
    shutil.copy(Path(filtered.path) / "report.html", report.path)


def evaluate(config_json: str, data_uri: str, model: Input[Model], metrics: Output[Metrics], report: Output[HTML],
             results: Output[Dataset], baseline: Input[Dataset] = None) -> str:
    """The configured benchmarks (conf/benchmark; relative data paths under the pipeline's data
    input) on `model`, next to `baseline`'s results (the initial checkpoint's) when given; returns
    the summary as JSON for the registry and the gate."""
    import json
    import shutil
    from pathlib import Path

    from components.config import parse_task_config
    from components.pipeline_components import log_metrics
    from components.registry.gate import eval_record
    from components.steps.evaluation import run_evaluation

    summary = run_evaluation(parse_task_config(config_json), data_uri, Path(model.path), Path(results.path),
                             Path(baseline.path) if baseline is not None else None)
    log_metrics(metrics, eval_record(summary)[0])
    shutil.copy(Path(results.path) / "report.html", report.path)
    return json.dumps({k: summary[k] for k in ("benchmarks", "overall")})


def export_triton(model: Input[Model], triton_repo: Output[Model], metrics: Output[Metrics]) -> None:
    """ONNX encoders (checked against torch) + the Triton model repository."""
    from pathlib import Path

    from components.pipeline_components import log_metrics
    from components.steps.export import export as step

    report = step(Path(model.path), Path(triton_repo.path))
    log_metrics(metrics, {f"onnx_max_abs_diff.{name}": graph["max_abs_diff"] for name, graph in report["onnx"].items()})


def register(config_json: str, parent_run_id: str, pipeline_run: str, model: Input[Model], eval_metrics: str,
             manifest_sha256: str, dataset: Input[Dataset], results: Input[Dataset], image_1: Input[Model] = None,
             image_2: Input[Model] = None, image_3: Input[Model] = None, video: Input[Model] = None,
             audio: Input[Model] = None, omni_align: Input[Model] = None, sft: Input[Model] = None,
             filtered: Input[Dataset] = None, results_before: Input[Dataset] = None) -> str:
    """Register the trained checkpoint as a new MLflow model version (alias `challenger`), after logging
    every step's record (reused from a cached run or not) as a child run of this pipeline run; the
    inputs that carry one are components.stages.RECORD_INPUTS."""
    given = dict(locals())  # the inputs by parameter name, taken before anything else is named here
    import json
    from pathlib import Path

    from components.config import parse_config
    from components.stages import RECORD_INPUTS
    from components.steps.lifecycle import register as step

    outputs = {task: (Path(given[name].path), given[name].uri) for name, task in RECORD_INPUTS.items()
               if given[name] is not None}
    return step(parse_config(config_json), Path(model.path), json.loads(eval_metrics), manifest_sha256,
                parent_run_id, pipeline_run, outputs)


def gate(config_json: str, version: str) -> str:
    """Compare the candidate with `@champion` under the configured rules: 'promote' or 'reject'."""
    from components.config import parse_config
    from components.steps.lifecycle import judge

    return "promote" if judge(parse_config(config_json), version)["promote"] else "reject"


def promote(config_json: str, version: str, parent_run_id: str, manifest: Output[Dataset]) -> None:
    """Move `champion` to the version and write (on a cluster: apply) its InferenceService."""
    from pathlib import Path

    from components.config import parse_config
    from components.steps.lifecycle import finish_tracking
    from components.steps.lifecycle import promote as step

    cfg = parse_config(config_json)
    step(cfg, version, Path(manifest.path))
    finish_tracking(cfg, parent_run_id)


def keep_champion(config_json: str, version: str, parent_run_id: str) -> None:
    """The gate said no: record it and close the pipeline's MLflow run; the champion stays."""
    from components.config import parse_config
    from components.steps.lifecycle import finish_tracking

    cfg = parse_config(config_json)
    print(f"version {version} was not promoted; see its promotion.* tags in MLflow")
    finish_tracking(cfg, parent_run_id)


# Where each step runs: its image and its node pool (pipelines/dag.py places the task by the same
# entry). GPU: the steps that run the model. CPU: bookkeeping, data prep, and the TrainJob launcher,
# which only waits while the job's own pods hold the GPUs.
POOLS = {
    resolve_config: "cpu", start_tracking: "cpu", data_prep: "cpu", register: "cpu", gate: "cpu", promote: "cpu",
    keep_champion: "cpu",
    train_stage_trainjob: "cpu",
    init_model: "gpu", train_stage: "gpu", sft_filter: "gpu", evaluate: "gpu", export_triton: "gpu",
}


def make_components(images: dict[str, str]) -> SimpleNamespace:
    """Each step as a KFP component on its pool's image (`images`: pool -> image ref); every
    component carries its pool as `.pool`."""
    built = {}
    for fn, pool in POOLS.items():
        component = dsl.component(fn, base_image=images[pool], install_kfp_package=False)
        component.pool = pool
        built[fn.__name__] = component
    return SimpleNamespace(**built)
