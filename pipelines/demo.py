"""`omni demo`: generated media -> the whole DAG locally -> serve the champion -> ask it three
multimodal questions over HTTP -> print what happened and where to look."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

from components import tracking
from components.config import OmniConfig
from components.lifecycle import mlflow_uri
from model.data.demo import make_demo
from model.data.shards import ShardStream
from pipelines.local import resolve_local, run_local

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
    from components.report import text_table

    return text_table(json.loads(metrics_path.read_text()))


TASK_LINE = re.compile(r"(Executing task|finished with status|Pipeline .* finished)")


@contextlib.contextmanager
def pipeline_log(path: Path) -> Iterator[None]:
    """Send everything the pipeline's steps print (kfp.local dumps each executor's full input and
    output) to `path`, and echo only the task start/finish lines to the console."""
    console = os.fdopen(os.dup(1), "w", buffering=1)
    done = threading.Event()

    def follow() -> None:
        with open(path, errors="replace") as f:
            while not done.is_set() or f.tell() < os.path.getsize(path):
                line = f.readline()
                if not line:
                    time.sleep(0.2)
                elif TASK_LINE.search(line):
                    console.write("      " + re.sub(r"\x1b\[[0-9;]*m", "", line.strip()) + "\n")

    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    tail = threading.Thread(target=follow, daemon=True)
    tail.start()
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])
        done.set()
        tail.join(timeout=5)
        console.close()


def run_demo(cfg: OmniConfig, keep_serving: bool = False) -> dict:
    start = time.time()
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
    try:
        with pipeline_log(log):
            metrics = run_local(cfg, raw)
    except Exception:
        print(
            f"the pipeline failed; the end of {log}:\n"
            + "".join(log.read_text(errors="replace").splitlines(True)[-40:])
        )
        raise
    uri = mlflow_uri(cfg)
    name = cfg.tracking.registered_model
    champion = tracking.get_alias_version(uri, name, tracking.CHAMPION)
    if champion is None:
        raise RuntimeError("the pipeline finished but no version has the champion alias")
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
    metrics_file = _latest(work / "pipeline_root", "results", "metrics.json")
    print("\nBenchmarks (the held-out set, read as benchmark files):\n" + eval_table(metrics_file))
    print(f"\nWall time: {time.time() - start:.0f} s")
    print("Where to look:")
    print(
        f"  MLflow:     mlflow ui --backend-store-uri {uri}   (experiment {cfg.tracking.experiment!r}, model {name!r})"
    )
    print(f"  Artifacts:  {work / 'pipeline_root'}")
    print(f"  Report:     {metrics_file.parent / 'report.html'}")
    print(f"  Endpoint:   omni serve --model-dir {champion_dir}  ->  POST /openai/v1/chat/completions")
    return {
        "metrics": metrics,
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
