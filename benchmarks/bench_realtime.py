"""Realtime benchmark: time from the end of speech to the first text delta on `/v1/realtime`.

    .venv/bin/python -m benchmarks.bench_realtime                     # a fresh tiny model, 1 and 8 sessions
    .venv/bin/python -m benchmarks.bench_realtime --model-dir CHECKPOINT --sessions 1 8 --turns 3

Each session streams spoken questions (espeak-ng, 24 kHz PCM16, 100 ms chunks) at real-time pace to
`python -m serving.server` on 127.0.0.1 and lets the server's VAD end each turn. Two figures per
turn: from `input_audio_buffer.speech_stopped` to the first `response.output_text.delta` (what the
server does once it has decided the turn is over), and from the last audio of speech leaving the
client to the first delta (adds the VAD's `silence_duration_ms` wait), and how the responses ended
(an untrained model may stop at once, with no delta). Prints one JSON object per line; p50/p95 over
every answered turn of every session. A benchmark: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect

from benchmarks.bench_data import machine_info
from benchmarks.bench_serving import emit, tiny_checkpoint
from model.media.decode import load_audio
from serving.local import start_server

RATE, CHUNK_S, SILENCE_MS = 24000, 0.1, 500
QUESTIONS = ["what color is the shape", "is the shape blue", "describe the picture", "count to three"]


def speech(text: str) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "--stdout", "-s", "160", text], check=True, capture_output=True).stdout
    voice = (load_audio(wav, RATE) * 32767).astype(np.int16)
    gap = np.zeros(int(RATE * 1.2), np.int16)
    return np.concatenate([gap[: RATE // 2], voice, gap])


async def session(url: str, turns: list[np.ndarray]) -> list[dict]:
    """Stream the turns at real-time pace; per turn the two latencies in ms."""
    sent_at: dict[int, float] = {}  # audio time (ms) at the end of each chunk -> when it left
    results, finished, audio_ms, stopped = [], [], 0, {}
    async with connect(url, max_size=None) as ws:
        await ws.recv()

        async def reader() -> None:
            async for raw in ws:
                event = json.loads(raw)
                if event["type"] == "input_audio_buffer.speech_stopped":
                    stopped.update(at=time.perf_counter(), speech_end=event["audio_end_ms"] - SILENCE_MS)
                elif event["type"] == "response.output_text.delta" and stopped:
                    now = time.perf_counter()
                    end = next(t for ms, t in sorted(sent_at.items()) if ms >= stopped["speech_end"])
                    results.append({"after_stop_ms": (now - stopped["at"]) * 1000,
                                    "after_speech_ms": (now - end) * 1000})
                    stopped.clear()
                elif event["type"] == "response.done":
                    finished.append(event["response"]["status"])

        reading = asyncio.create_task(reader())
        start = time.perf_counter()
        step = int(RATE * CHUNK_S)
        for samples in turns:
            for i in range(0, len(samples), step):
                chunk = samples[i:i + step]
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(chunk.astype("<i2").tobytes()).decode()}))
                audio_ms += len(chunk) * 1000 // RATE
                sent_at[audio_ms] = time.perf_counter()
                await asyncio.sleep(max(0.0, start + audio_ms / 1000 - time.perf_counter()))
        await asyncio.sleep(3)  # the last answer's first delta
        reading.cancel()
    return [*results, *({"status": s} for s in finished)]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else [values[0]] * 19
    return {"n": len(values), "p50": round(statistics.median(values), 1), "p95": round(q[18], 1)}


async def run(url: str, sessions: int, turns: list[np.ndarray]) -> dict:
    per_session = await asyncio.gather(*(session(url, turns) for _ in range(sessions)))
    rows = [r for rs in per_session for r in rs if "status" not in r]
    statuses = Counter(r["status"] for rs in per_session for r in rs if "status" in r)
    return {"sessions": sessions, "turns_spoken": sessions * len(turns), "responses": dict(statuses),
            "first_deltas": len(rows),
            "stop_to_first_delta_ms": percentiles([r["after_stop_ms"] for r in rows]),
            "speech_end_to_first_delta_ms": percentiles([r["after_speech_ms"] for r in rows])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_realtime", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, help="checkpoint to serve (default: a fresh tiny model)")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 8], help="concurrent sessions per run")
    p.add_argument("--turns", type=int, default=3, help="spoken questions per session")
    p.add_argument("--tokens", type=int, default=16, help="max tokens per answer")
    args = p.parse_args(argv)
    emit("machine", **machine_info(), server_threads=1)
    turns = [speech(QUESTIONS[i % len(QUESTIONS)]) for i in range(args.turns)]
    with tempfile.TemporaryDirectory(prefix="bench-realtime-") as tmp:
        checkpoint = args.model_dir or tiny_checkpoint(Path(tmp))
        server = start_server(checkpoint, Path(tmp) / "server", {"max_new_tokens": args.tokens})
        try:
            url = server.base.replace("http://", "ws://") + "/v1/realtime"
            for n in args.sessions:
                emit("realtime", **asyncio.run(run(url, n, turns)))
        finally:
            server.stop()
    emit("done")


if __name__ == "__main__":
    main()
