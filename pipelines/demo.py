"""`omni demo`: generated media -> the whole DAG locally -> serve the champion -> ask it three
multimodal questions over HTTP -> print what happened and where to look."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

from components.config import OmniConfig
from components.registry import tracking
from components.steps.lifecycle import mlflow_uri
from model.data.demo import make_demo
from model.data.shards import ShardStream
from pipelines.local import resolve_local

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_predictor(model_dir: Path, model_name: str, port: int, log_path: Path) -> subprocess.Popen:
    """The KServe predictor as a local process (what the InferenceService runs on a cluster)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.server", "--model-dir", str(model_dir), "--model-name", model_name,
             "--http-port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"predictor exited with {proc.returncode}; see {log_path}")
        try:
            if requests.get(f"http://{HOST}:{port}/v2/health/ready", timeout=1).ok:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise TimeoutError(f"predictor not ready after 120 s; see {log_path}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_request(record, fetch: Callable[[str], bytes], model_name: str) -> dict:
    """An OpenAI-style request from a held-out record: text parts + media (read with `fetch`) as data URIs."""
    parts: list[dict] = []
    media = iter(record.media_order())
    user = next(m for m in record.prompt_messages if m.role == "user").content
    for i, piece in enumerate(re.split(r"<(image|video|audio)>", user)):
        if i % 2 == 0:
            if piece:
                parts.append({"type": "text", "text": piece})
            continue
        _, uri = next(media)
        blob = fetch(uri)
        if piece == "image":
            parts.append({"type": "image_url", "image_url": {"url": data_uri(blob, "image/png")}})
        elif piece == "video":
            parts.append({"type": "video_url", "video_url": {"url": data_uri(blob, "video/mp4")}})
        else:
            wav = base64.b64encode(blob).decode()
            parts.append({"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}})
    return {"model": model_name, "messages": [{"role": "user", "content": parts}], "max_tokens": 16,
            "temperature": 0}


def ask_examples(port: int, data_dir: Path, model_name: str) -> list[dict]:
    """One image question, one audio transcription, one video question from the held-out split."""
    held_out = ShardStream(data_dir, "val")
    val = list(held_out.records())
    picks = [
        next(r for r in val if r.task == t) for t in ("image_mcq", "asr", "video_mcq") if any(r.task == t for r in val)
    ]
    answers = []
    for record in picks:
        body = chat_request(record, held_out.store.read_bytes, model_name)
        resp = requests.post(f"http://{HOST}:{port}/openai/v1/chat/completions", json=body, timeout=120)
        resp.raise_for_status()
        answers.append(
            {
                "task": record.task,
                "question": record.prompt_messages[-1].content,
                "expected": record.reference,
                "answer": resp.json()["choices"][0]["message"]["content"],
            }
        )
    return answers


def eval_table(metrics_path: Path) -> str:
    from components.reports.html import text_table

    return text_table(json.loads(metrics_path.read_text()))


# What the console shows of the pipeline's log: each task starting, reused from the cache, finishing
# (kfp.local's lines), and training progress (the stages' tqdm bars), a quarter at a time.
TASK_LINE = re.compile(r"(?:Executing task '(?P<started>[^']+)'|Task '?(?P<cached>[\w-]+)'? cache hit|"
                       r"Task '(?P<task>[^']+)' finished with status (?P<status>\w+)|"
                       r"Pipeline '(?P<pipeline>[^']+)' finished with status (?P<pipeline_status>\w+))")
STEP_LINE = re.compile(r"train (\w+):\s+(\d+)%\|[^|]*\|\s*(\d+)/(\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def task_event(m: re.Match) -> str:
    """One console line for a kfp.local task line."""
    if m["started"]:
        return f"started '{m['started']}'"
    if m["cached"]:
        return f"'{m['cached']}' cached: its inputs are unchanged, its outputs reused"
    if m["task"]:
        return f"'{m['task']}' finished with status {m['status']}"
    return f"pipeline '{m['pipeline']}' finished with status {m['pipeline_status']}"


class Progress:
    """Turns the pipeline's log into console lines, the same on a terminal and through a pipe."""

    def __init__(self, emit=print):
        self.emit, self.shown = emit, {}

    def line(self, raw: str) -> None:
        text = ANSI.sub("", raw)
        if task := TASK_LINE.search(text):
            self.emit("      " + task_event(task), flush=True)
        elif step := STEP_LINE.search(text):
            stage, pct, done, total = step.group(1), int(step.group(2)), step.group(3), step.group(4)
            if pct >= self.shown.get(stage, -25) + 25 or (pct == 100 and self.shown.get(stage) != 100):
                self.shown[stage] = pct
                self.emit(f"        {stage}: step {done}/{total}", flush=True)


def run_pipeline_process(cfg: OmniConfig, data: Path, log_path: Path) -> dict:
    """The DAG in a child process (its output, kfp.local's executor dumps included, to `log_path`),
    followed here: this process's own console output stays its own, whatever stdout is."""
    work = Path(cfg.run.workdir)
    config, result = work / "pipeline-config.json", work / "pipeline-result.json"
    config.write_text(cfg.to_json())
    result.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.local", str(config), str(data), "--out", str(result)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    progress, pending = Progress(), ""
    with open(log_path, "rb") as log:
        while True:
            finished = proc.poll() is not None
            chunk = log.read().decode(errors="replace")
            *lines, pending = re.split(r"[\r\n]", pending + chunk)
            for line in lines:
                progress.line(line)
            if finished and not chunk:
                break
            time.sleep(0.3)
    if proc.returncode:
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-40:])
        raise RuntimeError(f"the pipeline failed (exit {proc.returncode}); the end of {log_path}:\n{tail}")
    return json.loads(result.read_text())


def run_demo(cfg: OmniConfig, keep_serving: bool = False) -> dict:
    start = time.time()
    sys.stdout.reconfigure(line_buffering=True)  # each line as it is printed, on a terminal or through a pipe
    cfg = resolve_local(cfg)
    work = Path(cfg.run.workdir)
    raw = work / "demo-data"
    print(f"[1/4] generating demo media into {raw}")
    counts = make_demo(raw, cfg.data)
    print(f"      {counts['total']} records: " + ", ".join(f"{k}={v}" for k, v in counts.items() if k != "total"))
    log = work / "pipeline.log"
    print(
        "[2/4] running the pipeline locally (kfp.local): data-prep -> 7 training stages -> evaluate -> "
        f"export -> register -> gate -> promote\n      full log: {log}"
    )
    outputs = run_pipeline_process(cfg, raw, log)
    uri = mlflow_uri(cfg)
    name = cfg.tracking.registered_model
    champion = tracking.get_alias_version(uri, name, tracking.CHAMPION)
    if champion is None:
        raise RuntimeError("the pipeline finished but no version has the champion alias")
    # MLflow's download bar: eight small files, and through a pipe a line of carriage returns.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    champion_dir = tracking.download_version(uri, name, "champion", work / "serving" / f"v{champion.version}")
    prepared = _latest(work / "pipeline_root", "dataset", "manifest.json")
    print(f"[3/4] serving champion v{champion.version} with the KServe predictor on {HOST}")
    port = free_port()
    proc = start_predictor(champion_dir, cfg.serving.model_name, port, work / "predictor.log")
    try:
        answers = ask_examples(port, prepared.parent, cfg.serving.model_name)
    finally:
        if not keep_serving:
            stop(proc)
    print("[4/4] results\n")
    for a in answers:
        print(f"  {a['task']:<10} expected {a['expected']!r:<16} answered {a['answer']!r}")
    metrics_file = _latest(work / "pipeline_root", "evaluate/results", "metrics.json")
    print("\nBenchmarks (the held-out set, read as benchmark files):\n" + eval_table(metrics_file))
    print(f"\nWall time: {time.time() - start:.0f} s")
    print("Where to look:")
    print(
        f"  MLflow:     mlflow ui --backend-store-uri {uri}   (experiment {cfg.tracking.experiment!r}, model {name!r})"
    )
    print(f"  Artifacts:  {work / 'pipeline_root'}")
    print(f"  Report:     {metrics_file.parent / 'report.html'}")
    print(f"  Endpoint:   omni serve --model-dir {champion_dir}  ->  POST /openai/v1/chat/completions")
    if keep_serving:
        print(f"  Serving:    http://{HOST}:{port} (pid {proc.pid}), left running (--keep-serving): kill {proc.pid}")
    return {
        "outputs": outputs,
        "answers": answers,
        "champion": champion.version,
        "port": port,
        "process": proc if keep_serving else None,
        "seconds": time.time() - start,
    }


def _latest(root: Path, artifact: str, filename: str) -> Path:
    """The newest `<artifact>/<filename>` under the local pipeline root."""
    found = sorted(root.rglob(f"{artifact}/{filename}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {artifact}/{filename} under {root}")
    return found[-1]
