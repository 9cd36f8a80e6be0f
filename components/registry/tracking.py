"""Thin helpers over the MLflow client for pipeline steps.

Every pipeline step runs in its own process, so nothing here relies on MLflow's global
"active run": each function takes the tracking URI and the run ids it acts on. Runs are laid
out as one parent run per pipeline run and one child run per stage (tag `mlflow.parentRunId`),
which is how the MLflow UI nests them.

The registry holds the trained checkpoint as a plain artifact directory (no MLflow flavor):
a version's `source` is `runs:/<run_id>/model`, its lineage and eval metrics are version tags,
and the aliases `challenger` / `champion` / `previous-champion` say which version is which.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"

# Tags every registered version must carry so it can be traced back to what produced it.
LINEAGE_TAGS = ("pipeline_run_id", "data_manifest_sha256", "config_sha256", "git_sha")
METRIC_TAG_PREFIX = "metric."
MODEL_ARTIFACT_PATH = "model"
STAGE_TAG = "omni.stage"
REGISTRATION_TAG = "omni.registration"  # what makes a registration resumable (register_model_version)

# MLflow's own limits (mlflow.utils.validation): longer values are rejected, not truncated.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def tracking_uri(uri: str | None, workdir: Path) -> str:
    """The URI to use: `uri` as given, or the embedded default, a sqlite file under `workdir`."""
    if uri:
        return uri
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'mlflow.db'}"


@functools.lru_cache(maxsize=8)
def client(uri: str) -> MlflowClient:
    """One client per URI and process: opening a sqlite store checks its schema (~1 s)."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _default_artifact_location(uri: str) -> str | None:
    """Next to the sqlite file; otherwise the server decides.

    Without this, a sqlite-backed client writes artifacts to `./mlruns` of whatever directory
    the step happens to run in.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.resolve().parent / "mlartifacts").as_uri()


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing (safe when two steps race to create it)."""
    c = client(uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return c.create_experiment(name, artifact_location=_default_artifact_location(uri))
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return c.get_experiment_by_name(name).experiment_id


def start_pipeline_run(
    uri: str, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None
) -> str:
    """Create the parent run of a pipeline run and return its id. It stays RUNNING until
    `end_run` (the last step, or an exit handler, closes it)."""
    run = client(uri).create_run(ensure_experiment(uri, experiment), run_name=run_name, tags=_str_tags(tags))
    return run.info.run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED / FAILED / KILLED."""
    if status not in {"FINISHED", "FAILED", "KILLED"}:
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    client(uri).set_terminated(run_id, status=status)


class StageRun:
    """A handle on one run that logs through the client (no global state)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        log_params(self.uri, self.run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        log_metrics(self.uri, self.run_id, metrics, step=step)

    def log_metric_history(self, key: str, values: Mapping[int, float] | list[float]) -> None:
        log_metric_history(self.uri, self.run_id, key, values)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        log_artifact(self.uri, self.run_id, path, artifact_path)

    def log_artifacts(self, local_dir: Path | str, artifact_path: str | None = None) -> None:
        log_artifacts(self.uri, self.run_id, local_dir, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        c = client(self.uri)
        for key, value in _str_tags(tags).items():
            c.set_tag(self.run_id, key, value)


@contextmanager
def stage_run(
    uri: str,
    experiment: str,
    parent_run_id: str | None,
    stage_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[StageRun]:
    """A child run for one stage, nested under the pipeline's parent run (a run of its own when
    `parent_run_id` is None: a stage run by hand, `omni train`).

    Params are flattened (`{"stage": {"lr": 1}}` -> `stage.lr`). The run ends FINISHED when the
    block exits normally and FAILED when it raises (the exception propagates).
    """
    experiment_id = ensure_experiment(uri, experiment)
    all_tags = {**_str_tags(tags), STAGE_TAG: stage_name}
    if parent_run_id is not None:
        parent = client(uri).get_run(parent_run_id)  # fails early on a wrong id
        if parent.info.experiment_id != experiment_id:
            # The UI only nests runs of one experiment.
            raise ValueError(f"parent run {parent_run_id} belongs to experiment {parent.info.experiment_id}, "
                             f"not {experiment!r}")
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client(uri).create_run(experiment_id, run_name=stage_name, tags=all_tags)
    handle = StageRun(uri, run.info.run_id)
    try:
        if params:
            handle.log_params(params)
        yield handle
    except BaseException:
        try:
            end_run(uri, handle.run_id, "FAILED")
        except MlflowException:  # the server is what failed: the run stays RUNNING, the first error tells why
            pass
        raise
    end_run(uri, handle.run_id, "FINISHED")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings become dotted keys; values become strings of at most 6000 chars."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if isinstance(value, Mapping | list | tuple):
            text = json.dumps(value, default=str, sort_keys=True)
        else:
            text = str(value)
        flat[_clean_key(name)] = text[:MAX_PARAM_VALUE_LENGTH]
    return flat


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    flat = flatten_params(params)
    # log_batch splits into MLflow's 100-params-per-request chunks itself.
    client(uri).log_batch(run_id, params=[Param(k, v) for k, v in flat.items()])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log several metrics at one step (e.g. the losses at a training step)."""
    now = int(time.time() * 1000)
    batch = [Metric(_clean_key(k), float(v), now, step or 0) for k, v in metrics.items()]
    client(uri).log_batch(run_id, metrics=batch)


def log_metric_history(uri: str, run_id: str, key: str, values: Mapping[int, float] | list[float]) -> None:
    """Log a whole curve for one metric in one request: `{step: value}` or a list (step = index)."""
    points = values.items() if isinstance(values, Mapping) else enumerate(values)
    now = int(time.time() * 1000)
    batch = [Metric(_clean_key(key), float(v), now, int(step)) for step, v in points]
    client(uri).log_batch(run_id, metrics=batch)


def log_artifact(uri: str, run_id: str, path: Path | str, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def log_artifacts(uri: str, run_id: str, local_dir: Path | str, artifact_path: str | None = None) -> None:
    client(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def register_model_version(
    uri: str,
    model_name: str,
    checkpoint_dir: Path,
    run_id: str,
    tags: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
    registration_key: str | None = None,
) -> str:
    """Upload `checkpoint_dir` as the run's `model/` artifacts, register it as a new version of
    `model_name`, and point the `challenger` alias at it. Returns the version number.

    `tags` must hold the lineage keys in LINEAGE_TAGS (`git_sha` is filled in when absent);
    `metrics` (the eval results) are stored as `metric.<name>` tags, which is what the gate reads.

    With a `registration_key` (the pipeline step passes its pipeline run) the call is resumable: a
    re-run after an outage finds the version an earlier attempt with the same key and tags created
    (a version is created with all its tags in one request) and completes it (the alias) instead of
    leaving it behind and registering another.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir() or not any(checkpoint_dir.iterdir()):
        raise ValueError(f"checkpoint directory {checkpoint_dir} is missing or empty")
    version_tags = _str_tags(tags)
    version_tags.setdefault("git_sha", git_sha())
    missing = [k for k in LINEAGE_TAGS if not version_tags.get(k)]
    if missing:
        raise ValueError(f"lineage tags missing: {', '.join(missing)}")
    for name, value in (metrics or {}).items():
        version_tags[f"{METRIC_TAG_PREFIX}{_clean_key(name)}"] = repr(float(value))

    if registration_key is not None:
        version_tags[REGISTRATION_TAG] = registration_key
    c = client(uri)
    mv = _registered(c, model_name, version_tags) if registration_key is not None else None
    if mv is None:
        c.log_artifacts(run_id, str(checkpoint_dir), MODEL_ARTIFACT_PATH)
        try:
            c.create_registered_model(model_name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # MlflowClient.create_model_version stores `runs:/...` as the source as is. (The fluent
        # mlflow.register_model would insist on an MLmodel file or a LoggedModel in MLflow 3.)
        mv = c.create_model_version(
            model_name, f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}", run_id=run_id, tags=version_tags
        )
    version = str(mv.version)  # the sqlite store returns an int
    c.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


def _registered(c: MlflowClient, model_name: str, tags: Mapping[str, str]) -> ModelVersion | None:
    """The version an earlier attempt of this very registration created: same key, same tags."""
    key = tags[REGISTRATION_TAG].replace("'", "")
    try:
        found = c.search_model_versions(f"name='{model_name}' and tags.`{REGISTRATION_TAG}`='{key}'")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return next((v for v in found if all(v.tags.get(k) == val for k, val in tags.items())), None)


class RegistryUnavailable(RuntimeError):
    """The MLflow server did not answer, after the client's retries with backoff."""


@contextmanager
def registry_outage(uri: str, doing: str) -> Iterator[None]:
    """Turn "the server did not answer" (after MLflow's own retries with exponential backoff:
    MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR) into one clear error that
    says what to do. Other registry errors (a missing version, a bad name) pass unchanged."""
    try:
        yield
    except MlflowException as e:
        if not str(e.message).startswith("API request to"):  # how MLflow's REST client reports transport errors
            raise
        raise RegistryUnavailable(
            f"{doing}: the MLflow server at {uri} did not answer after "
            f"{MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()} retries with backoff ({str(e.message)[:300]}). Nothing is "
            "left half-done that a re-run does not finish: re-run this step once the server is back"
        ) from e


def get_version(uri: str, model_name: str, version: str | int) -> ModelVersion:
    return client(uri).get_model_version(model_name, str(version))


def get_alias_version(uri: str, model_name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at; None when the model or the alias does not exist."""
    c = client(uri)
    try:
        registered = c.get_registered_model(model_name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    # Looked up through the registered model's alias map rather than
    # get_model_version_by_alias, which reports a missing alias as INVALID_PARAMETER_VALUE.
    version = registered.aliases.get(alias)
    return None if version is None else c.get_model_version(model_name, str(version))


def version_metrics(version: ModelVersion) -> dict[str, float]:
    """The eval metrics stored on a version as `metric.<name>` tags."""
    return {
        key.removeprefix(METRIC_TAG_PREFIX): float(value)
        for key, value in version.tags.items()
        if key.startswith(METRIC_TAG_PREFIX)
    }


def set_alias(uri: str, model_name: str, alias: str, version: str | int) -> None:
    client(uri).set_registered_model_alias(model_name, alias, str(version))


def delete_alias(uri: str, model_name: str, alias: str) -> None:
    client(uri).delete_registered_model_alias(model_name, alias)


def set_version_tags(uri: str, model_name: str, version: str | int, tags: Mapping[str, Any]) -> None:
    c = client(uri)
    for key, value in _str_tags(tags).items():
        c.set_model_version_tag(model_name, str(version), key, value)


def download_version(uri: str, model_name: str, version_or_alias: str | int, dst: Path) -> Path:
    """Download a version's checkpoint directory into `dst`; returns the directory.

    `version_or_alias` is a version number ("3") or an alias ("champion"), resolved once here
    so the download cannot mix two versions if the alias moves meanwhile.
    """
    ref = str(version_or_alias)
    if ref.isdigit():
        mv = get_version(uri, model_name, ref)
    else:
        mv = get_alias_version(uri, model_name, ref)
        if mv is None:
            raise LookupError(f"model {model_name!r} has no alias {ref!r}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    source = client(uri).get_model_version_download_uri(model_name, str(mv.version))
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri)
    return Path(local)


def git_sha() -> str:
    """Best effort: $OMNI_GIT_SHA (set in images), else the checkout's HEAD, else "unknown"."""
    if sha := os.environ.get("OMNI_GIT_SHA"):
        return sha
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_sha256(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): equal configs hash equal."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _json_default(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # pydantic models
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    raise TypeError(f"cannot hash a {type(value).__name__} as config")


def _clean_key(key: str) -> str:
    """MLflow accepts only [/\\w.- :] in keys, up to 250 chars."""
    return _BAD_KEY_CHARS.sub("_", key)[:MAX_KEY_LENGTH]


def _str_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {_clean_key(str(key)): str(value) for key, value in (tags or {}).items()}
