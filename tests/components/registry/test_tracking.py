"""components.registry.tracking against a real MLflow sqlite store (one per module: its init takes seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from components.registry import tracking

EXPERIMENT = "omni-test"


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tracking.tracking_uri(None, tmp_path_factory.mktemp("mlflow") / "work")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    (ckpt / "tokenizer").mkdir(parents=True)
    (ckpt / "omni_config.json").write_text('{"hidden_size": 8}')
    (ckpt / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (ckpt / "tokenizer" / "tokenizer.json").write_text("{}")
    return ckpt


def lineage(**extra: str) -> dict[str, str]:
    return {
        "pipeline_run_id": "p-1",
        "data_manifest_sha256": "d" * 64,
        "config_sha256": "c" * 64,
        "git_sha": "abc123",
        **extra,
    }


def test_tracking_uri_default_is_sqlite_under_workdir(tmp_path: Path) -> None:
    uri = tracking.tracking_uri(None, tmp_path / "a" / "b")
    assert uri == f"sqlite:///{(tmp_path / 'a' / 'b').resolve()}/mlflow.db"
    assert (tmp_path / "a" / "b").is_dir()
    assert tracking.tracking_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"


def test_stage_runs_nest_under_the_pipeline_run(uri: str, tmp_path: Path) -> None:
    parent = tracking.start_pipeline_run(uri, EXPERIMENT, "pipeline-1", tags={"trigger": "test"})
    params = {"stage": {"lr": 1e-3, "steps": 10, "freeze": ["llm", "vision"]}, "note": "x" * 7000}
    with tracking.stage_run(uri, EXPERIMENT, parent, "image_1", params) as stage:
        stage.log_metrics({"loss": 2.5, "lr": 1e-3}, step=0)
        stage.log_metrics({"loss": 2.0}, step=1)
        stage.log_metric_history("val_loss", [3.0, 2.0, 1.5])
        report = tmp_path / "report.html"
        report.write_text("<html></html>")
        stage.log_artifact(report, "reports")
    with tracking.stage_run(uri, EXPERIMENT, parent, "sft", {"steps": 5}):
        pass
    tracking.end_run(uri, parent)

    c = tracking.client(uri)
    assert c.get_run(parent).info.status == "FINISHED"
    children = c.search_runs(
        [c.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'",
    )
    assert sorted(r.info.run_name for r in children) == ["image_1", "sft"]
    run = c.get_run(stage.run_id)
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert run.info.status == "FINISHED"
    assert run.data.params["stage.lr"] == "0.001"
    assert run.data.params["stage.steps"] == "10"
    assert run.data.params["stage.freeze"] == '["llm", "vision"]'
    assert len(run.data.params["note"]) == tracking.MAX_PARAM_VALUE_LENGTH
    assert [(m.step, m.value) for m in c.get_metric_history(stage.run_id, "loss")] == [(0, 2.5), (1, 2.0)]
    assert [
        m.value for m in sorted(c.get_metric_history(stage.run_id, "val_loss"), key=lambda m: m.step)
    ] == [
        3.0,
        2.0,
        1.5,
    ]
    assert [a.path for a in c.list_artifacts(stage.run_id, "reports")] == ["reports/report.html"]
    # Artifacts live next to the sqlite file, not in the current directory.
    db_dir = Path(uri.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith((db_dir / "mlartifacts").as_uri())


def test_failing_stage_marks_its_run_failed(uri: str) -> None:
    parent = tracking.start_pipeline_run(uri, EXPERIMENT, "pipeline-2")
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run(uri, EXPERIMENT, parent, "video", {}) as stage:
            raise RuntimeError("boom")
    assert tracking.client(uri).get_run(stage.run_id).info.status == "FAILED"


def test_stage_run_rejects_parent_of_another_experiment(uri: str) -> None:
    parent = tracking.start_pipeline_run(uri, "other-experiment", "p")
    with pytest.raises(ValueError, match="experiment"):
        with tracking.stage_run(uri, EXPERIMENT, parent, "sft", {}):
            pass


def test_register_twice_gives_versions_with_lineage_and_challenger(
    uri: str, checkpoint: Path, tmp_path: Path
) -> None:
    parent = tracking.start_pipeline_run(uri, EXPERIMENT, "pipeline-3")
    versions = []
    for accuracy in (0.25, 0.5):
        with tracking.stage_run(uri, EXPERIMENT, parent, "register", {}) as stage:
            versions.append(
                tracking.register_model_version(
                    uri,
                    "omni-reg",
                    checkpoint,
                    stage.run_id,
                    lineage(pipeline_run_id=parent),
                    metrics={"mcq_accuracy": accuracy, "wer": 0.1},
                )
            )
    assert versions == ["1", "2"]

    second = tracking.get_alias_version(uri, "omni-reg", tracking.CHALLENGER)
    assert second is not None and str(second.version) == "2"
    assert second.source == f"runs:/{second.run_id}/model"
    assert second.tags["pipeline_run_id"] == parent
    assert second.tags["git_sha"] == "abc123"
    assert {k for k in tracking.LINEAGE_TAGS} <= set(second.tags)
    assert tracking.version_metrics(second) == {"mcq_accuracy": 0.5, "wer": 0.1}
    first = tracking.get_version(uri, "omni-reg", 1)
    assert tracking.version_metrics(first)["mcq_accuracy"] == 0.25
    assert tracking.get_alias_version(uri, "omni-reg", tracking.CHAMPION) is None
    assert tracking.get_alias_version(uri, "no-such-model", tracking.CHAMPION) is None

    for ref in ("1", tracking.CHALLENGER):
        local = tracking.download_version(uri, "omni-reg", ref, tmp_path / f"dl-{ref}")
        got = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        assert got == ["model.safetensors", "omni_config.json", "tokenizer/tokenizer.json"]
        assert (local / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    with pytest.raises(LookupError):
        tracking.download_version(uri, "omni-reg", "champion", tmp_path / "none")


def test_register_requires_lineage_and_a_checkpoint(uri: str, checkpoint: Path, tmp_path: Path) -> None:
    run_id = tracking.start_pipeline_run(uri, EXPERIMENT, "p")
    tags = lineage()
    del tags["data_manifest_sha256"]
    with pytest.raises(ValueError, match="data_manifest_sha256"):
        tracking.register_model_version(uri, "omni-bad", checkpoint, run_id, tags)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        tracking.register_model_version(uri, "omni-bad", tmp_path / "empty", run_id, lineage())


def test_flatten_params() -> None:
    flat = tracking.flatten_params({"a": {"b": {"c": 1}, "d": None, "e": {}}, "bad key?": True})
    assert flat == {"a.b.c": "1", "a.d": "None", "a.e": "{}", "bad key_": "True"}


def test_config_sha256_is_canonical() -> None:
    a = {"x": 1, "y": {"b": [1, 2], "a": "s"}}
    b = {"y": {"a": "s", "b": [1, 2]}, "x": 1}
    assert tracking.config_sha256(a) == tracking.config_sha256(b)
    assert tracking.config_sha256(a) != tracking.config_sha256({**a, "x": 2})
    assert len(tracking.config_sha256(a)) == 64
    with pytest.raises(TypeError):
        tracking.config_sha256({"f": object()})


def test_git_sha_prefers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNI_GIT_SHA", "deadbeef")
    assert tracking.git_sha() == "deadbeef"
    monkeypatch.delenv("OMNI_GIT_SHA")
    assert tracking.git_sha()  # a sha, or "unknown" outside a checkout with commits
