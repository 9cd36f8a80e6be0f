"""Step records -> MLflow child runs, on a real MLflow sqlite store: an output made by this pipeline
run is logged once, a reused (cached) one links the run that logged it first, a retried register
logs nothing twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.registry import lineage, records, tracking

EXPERIMENT = "records"


@pytest.fixture()
def uri(tmp_path: Path) -> str:
    return tracking.tracking_uri(None, tmp_path / "mlflow")


def _output(tmp_path: Path, pipeline_run: str, name: str, loss: float) -> tuple[Path, str]:
    """A step's output folder as kfp.local lays it out (under the pipeline run's name), with its record."""
    folder = tmp_path / pipeline_run / name
    records.write_record(folder, name, params={"lr": 0.001}, metrics={"loss": loss}, history={"loss": [2.0, loss]})
    return folder, str(folder)


def _children(uri: str, parent: str) -> list:
    experiment_id = tracking.ensure_experiment(uri, EXPERIMENT)
    return tracking.client(uri).search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def test_a_reused_output_links_its_first_run_and_a_retry_logs_nothing_twice(uri: str, tmp_path: Path) -> None:
    first = tracking.start_pipeline_run(uri, EXPERIMENT, "run-1")
    outputs = {"image_1": _output(tmp_path, "run-1", "image_1", 1.5), "sft": _output(tmp_path, "run-1", "sft", 1.2)}
    lineage_1 = lineage.log_records(uri, EXPERIMENT, first, "run-1", outputs)
    assert len(_children(uri, first)) == 2 and lineage_1["lineage.sft.reused"] == "false"
    sft_run = tracking.client(uri).get_run(lineage_1["lineage.sft.run_id"])
    assert sft_run.data.metrics["loss"] == 1.2 and sft_run.data.params["lr"] == "0.001"

    # The second run reuses image_1's cached output and trains sft again.
    second = tracking.start_pipeline_run(uri, EXPERIMENT, "run-2")
    outputs_2 = {"image_1": outputs["image_1"], "sft": _output(tmp_path, "run-2", "sft", 1.1)}
    lineage_2 = lineage.log_records(uri, EXPERIMENT, second, "run-2", outputs_2)
    assert lineage_2["lineage.image_1.reused"] == "true"
    assert lineage_2["lineage.image_1.run_id"] == lineage_1["lineage.image_1.run_id"]
    assert lineage_2["lineage.sft.run_id"] != lineage_1["lineage.sft.run_id"]
    assert [r.data.tags[lineage.RECORD_TAG] for r in _children(uri, second)] == ["sft"]

    # register retried after an outage: the same lineage, no new child run
    assert lineage.log_records(uri, EXPERIMENT, second, "run-2", outputs_2) == lineage_2
    assert len(_children(uri, second)) == 1


def test_an_output_without_a_record_is_left_out(uri: str, tmp_path: Path) -> None:
    parent = tracking.start_pipeline_run(uri, EXPERIMENT, "run-1")
    (tmp_path / "run-1" / "skipped").mkdir(parents=True)
    assert lineage.log_records(uri, EXPERIMENT, parent, "run-1", {"video": (tmp_path / "run-1" / "skipped",
                                                                           str(tmp_path / "run-1" / "skipped"))}) == {}
