"""Serving benchmark: concurrency scaling, endpoint overhead and a mixed load, on the real server.

    make bench                                        # after the training and data benchmarks
    .venv/bin/python -m benchmarks.bench_serving      # this part alone (a few minutes on 2 cores)
    .venv/bin/python -m benchmarks.bench_serving --quick --model-dir CHECKPOINT

Measured side by side in one run, with the official `openai` client against `python -m
serving.server` on 127.0.0.1 (one torch thread in the server, like the in-process runs):

1. throughput with 8 concurrent clients / 1 client, for the `continuous` batching policy (the
   default) and the `dynamic` one (batch after a window, run to its end);
2. p50 latency of one request through the endpoint / the same request answered in-process
   (media decoded, `OmniChat.generate`; and the in-process engine, for the split);
3. a mixed load: `--load` requests (10,000), 16 concurrent, 20% malformed; every status counted,
   the server's RSS before and after, alive at the end;
4. one image question with 16 new tokens (greedy), from 1 client and from 8, alternated over
   `--rounds` rounds; the median of the rounds' ratios, with the machine's load average
   (`scaling_image`), on a server with the engine's prefix cache on (the default: the repeated
   question reuses its prompt's keys and values) and on one with it off.

1-3 run with the prefix cache off: they repeat their requests, and the policies, the endpoint and the
in-process paths are compared on the same work.

Prints one JSON object per line (`"kind"`: machine, scaling, scaling_image, latency, load, done), then a
table.
A benchmark, not a test: it asserts nothing about speed (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import torch
from omegaconf import OmegaConf
from PIL import Image

from benchmarks.bench_data import machine_info
from model.config import EngineConfig, ModelConfig
from model.media.inputs import MediaReader, RawMedia
from model.media.limits import MediaLimits
from model.nn.engine import GenerationEngine, Sequence
from model.nn.generation import OmniChat
from model.nn.omni import OmniModel
from model.nn.sampling import SamplingParams
from model.text.processor import ChatInput, OmniProcessor
from model.text.tokenizer import train_tokenizer
from serving.config import ServingConfig
from serving.local import LiveServer, metric, start_server

REPO = Path(__file__).resolve().parents[1]
WORDS = "what color is the shape red green blue yellow describe transcribe the audio one two three A B C D"
PROMPTS = ["what color is the shape", "describe the picture", "is it red or blue", "count to three",
           "which shape is it", "say hello", "A B C D", "what is shown"]


def emit(kind: str, **fields) -> dict:
    record = {"kind": kind, **fields}
    print(json.dumps(record), flush=True)
    return record


def png(seed: int, size: int = 48) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def tiny_checkpoint(root: Path) -> Path:
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")))
    tok = train_tokenizer([WORDS] * 20, 400)
    processor = OmniProcessor(tok, cfg)
    torch.manual_seed(0)
    return OmniModel(cfg, len(tok), processor.placeholder_ids).save_pretrained(root / "tiny", tok)


# ----------------------------------------------------------------------------------------- scaling
def _fixed_length_request(i: int, tokens: int, no_eos: dict) -> dict:
    """Greedy, end-of-answer banned: every answer is exactly `tokens` long, so runs compare."""
    content = [image_part(png(i)), {"type": "text", "text": PROMPTS[i % len(PROMPTS)]}] if i % 4 == 0 \
        else PROMPTS[i % len(PROMPTS)]
    return {"model": "omni", "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "temperature": 0, "logit_bias": no_eos}


def _run_clients(client: openai.OpenAI, requests_: list[dict], concurrency: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda r: client.chat.completions.create(**r), requests_))
    return time.perf_counter() - start


def scaling(server: LiveServer, policy: str, n: int, tokens: int, no_eos: dict) -> dict:
    reqs = [_fixed_length_request(i, tokens, no_eos) for i in range(n)]
    with openai.OpenAI(base_url=f"{server.base}/openai/v1", api_key="bench", max_retries=0) as client:
        _run_clients(client, reqs[:4], 4)  # warm-up: first-call paths, allocator
        one = _run_clients(client, reqs, 1)
        before = requests_metrics(server)
        eight = _run_clients(client, reqs, 8)
        after = requests_metrics(server)
    steps = metric(after, "omni_batch_size_count") - metric(before, "omni_batch_size_count")
    seqs = metric(after, "omni_batch_size_sum") - metric(before, "omni_batch_size_sum")
    return emit("scaling", policy=policy, requests=n, tokens_per_answer=tokens,
                requests_per_s_1=round(n / one, 2), requests_per_s_8=round(n / eight, 2),
                tokens_per_s_1=round(n * tokens / one, 1), tokens_per_s_8=round(n * tokens / eight, 1),
                ratio_8_over_1=round(one / eight, 2), mean_batch_8=round(seqs / max(steps, 1), 2))


def image_question_scaling(server: LiveServer, n: int, rounds: int, prefix_cache: bool, tokens: int = 16) -> dict:
    """One image question (greedy, `tokens` new tokens) asked `n` times by 1 client and `n` times by 8
    at once, the two alternated `rounds` times (which goes first alternates too): load from other work
    on the machine then weighs on both sides alike, and the figure is the median of the rounds' ratios,
    with the load average before and after."""
    request = {"model": "omni", "max_tokens": tokens, "temperature": 0, "messages": [
        {"role": "user", "content": [image_part(png(1)), {"type": "text", "text": "describe the picture"}]}]}
    seconds: dict[int, list[float]] = {1: [], 8: []}
    load_before = os.getloadavg()[0]
    with openai.OpenAI(base_url=f"{server.base}/openai/v1", api_key="bench", max_retries=0) as client:
        _run_clients(client, [request] * 8, 8)  # warm-up
        for i in range(rounds):
            for clients in ((1, 8) if i % 2 == 0 else (8, 1)):
                seconds[clients].append(_run_clients(client, [request] * n, clients))
    ratios = [one / eight for one, eight in zip(seconds[1], seconds[8], strict=True)]
    return emit("scaling_image", prefix_cache=prefix_cache, requests=n, max_tokens=tokens, rounds=rounds,
                requests_per_s_1=round(n / statistics.median(seconds[1]), 2),
                requests_per_s_8=round(n / statistics.median(seconds[8]), 2),
                ratio_8_over_1=round(statistics.median(ratios), 2),
                ratio_range=[round(min(ratios), 2), round(max(ratios), 2)],
                load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)])


def requests_metrics(server: LiveServer) -> str:
    return httpx.get(f"{server.base}/metrics", timeout=10).text


# ----------------------------------------------------------------------------------------- latency
LATENCY_PROMPT = "describe"


def in_process_worker(checkpoint: Path, tokens: int) -> None:
    """`--in-process-worker`: a fresh interpreter set up like the server (one thread) that answers
    the latency request in-process on each "generate" / "engine" line and prints its seconds."""
    import sys

    torch.set_num_threads(1)
    chat = OmniChat.load(checkpoint)
    engine = GenerationEngine(chat, EngineConfig(prefix_cache=False))  # as the server it is compared with
    reader = MediaReader(chat.model.cfg, MediaLimits.of("serving.limits", ServingConfig().limits))
    data = png(7)

    def item() -> ChatInput:  # as the endpoint does: decode with the limits, tokenise, generate
        return reader.chat_input([{"role": "user", "content": f"<image>{LATENCY_PROMPT}"}],
                                 [RawMedia("image", data, "image[0]")])

    calls = {
        "generate": lambda: chat.generate([item()], max_new_tokens=tokens)[0],
        "engine": lambda: engine.run_until_done([Sequence(chat.processor.encode(item(), add_generation_prompt=True),
                                                          SamplingParams(max_new_tokens=tokens))])[0].text.strip(),
    }
    for line in sys.stdin:
        start = time.perf_counter()
        text = calls[line.strip()]()
        print(json.dumps({"seconds": time.perf_counter() - start, "text": text}), flush=True)


def latency(server: LiveServer, checkpoint: Path, reps: int, tokens: int) -> dict:
    """One image question, greedy, `tokens` long: through the endpoint, and in-process in a worker
    process set up like the server, alternated; p50 of each."""
    request = {"model": "omni", "max_tokens": tokens, "temperature": 0, "messages": [
        {"role": "user", "content": [image_part(png(7)), {"type": "text", "text": LATENCY_PROMPT}]}]}
    worker = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_serving", "--in-process-worker",
                               "--model-dir", str(checkpoint), "--tokens", str(tokens)], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def in_process(name: str) -> tuple[float, str]:
        worker.stdin.write(name + "\n")
        worker.stdin.flush()
        reply = json.loads(worker.stdout.readline())
        return reply["seconds"], reply["text"]

    times: dict[str, list[float]] = {"endpoint": [], "generate": [], "engine": []}
    try:
        with openai.OpenAI(base_url=f"{server.base}/openai/v1", api_key="bench", max_retries=0) as client:
            served = client.chat.completions.create(**request)
            texts = {served.choices[0].message.content, in_process("generate")[1], in_process("engine")[1]}
            assert len(texts) == 1, f"endpoint and in-process answers differ: {texts}"
            for _ in range(reps):
                start = time.perf_counter()
                client.chat.completions.create(**request)
                times["endpoint"].append(time.perf_counter() - start)
                for name in ("generate", "engine"):
                    times[name].append(in_process(name)[0])
    finally:
        worker.stdin.close()
        worker.wait(timeout=30)
    p50 = {name: statistics.median(t) for name, t in times.items()}
    return emit("latency", reps=reps, completion_tokens=served.usage.completion_tokens,
                p50_ms={k: round(v * 1000, 2) for k, v in p50.items()},
                ratio_endpoint_over_generate=round(p50["endpoint"] / p50["generate"], 3),
                ratio_endpoint_over_engine=round(p50["endpoint"] / p50["engine"], 3))


# -------------------------------------------------------------------------------------------- load
MALFORMED = {
    "bad base64": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64"}}]}]},
    "not an image": {"messages": [{"role": "user", "content": [image_part(b"definitely not a png")]}]},
    "unknown field": {"messages": [{"role": "user", "content": "hi"}], "tools_please": True},
    "temperature out of range": {"messages": [{"role": "user", "content": "hi"}], "temperature": 9},
    "no messages": {"messages": []},
    "bad role": {"messages": [{"role": "robot", "content": "hi"}]},
    "unknown model": {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
    "max_tokens over the limit": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
    "non-JSON body": None,
}


def _one_load_request(client: openai.OpenAI, raw: httpx.Client, i: int, rng: random.Random) -> tuple[str, int, bool]:
    if rng.random() < 0.2:
        name = rng.choice(list(MALFORMED))
        body = MALFORMED[name]
        r = raw.post("/chat/completions", content=b"{nope" if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        message = r.json().get("error", {}).get("message") if r.headers.get("content-type", "").startswith(
            "application/json") else None
        return "malformed", r.status_code, bool(message)
    req = _fixed_length_request(i, 8, {})
    req["temperature"] = rng.choice([0, 0.7, 1.0])
    try:
        r = client.chat.completions.with_raw_response.create(**req)
        return "good", r.status_code, True
    except openai.APIStatusError as e:
        return "good", e.status_code, bool(e.message)


def load(server: LiveServer, total: int, concurrency: int) -> dict:
    proc = psutil.Process(server.proc.pid)
    rss_before = proc.memory_info().rss
    rng = random.Random(0)
    seeds = [rng.randrange(2**31) for _ in range(total)]
    start = time.perf_counter()
    with openai.OpenAI(base_url=f"{server.base}/openai/v1", api_key="bench", max_retries=0) as client, \
            httpx.Client(base_url=f"{server.base}/openai/v1", timeout=120) as raw, \
            ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: _one_load_request(client, raw, i, random.Random(seeds[i])), range(total)))
    seconds = time.perf_counter() - start
    statuses = Counter(f"{kind}:{status}" for kind, status, _ in results)
    alive = httpx.get(f"{server.base}/v2/health/ready", timeout=10).status_code == 200
    malformed = [(s, m) for kind, s, m in results if kind == "malformed"]
    return emit("load", requests=total, concurrency=concurrency, seconds=round(seconds, 1),
                requests_per_s=round(total / seconds, 1), statuses=dict(sorted(statuses.items())),
                responses_5xx=sum(1 for _, s, _ in results if s >= 500),
                malformed=len(malformed),
                malformed_4xx_with_message=sum(1 for s, m in malformed if 400 <= s < 500 and m),
                rss_mb_before=round(rss_before / 2**20, 1), rss_mb_after=round(proc.memory_info().rss / 2**20, 1),
                alive_after=alive)


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, help="checkpoint to serve (default: a fresh tiny model)")
    p.add_argument("--requests", type=int, default=48, help="requests per scaling run")
    p.add_argument("--tokens", type=int, default=32, help="tokens per answer in the scaling and latency runs")
    p.add_argument("--reps", type=int, default=20, help="latency repetitions (each: endpoint, generate, engine)")
    p.add_argument("--load", type=int, default=10_000, help="requests in the mixed load (0: skip)")
    p.add_argument("--concurrency", type=int, default=16, help="clients in the mixed load")
    p.add_argument("--rounds", type=int, default=5, help="alternated 1-client / 8-client rounds of the image question")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 requests, 5 reps, 3 rounds, a 500-request load")
    p.add_argument("--in-process-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.reps, args.rounds, args.load = 16, 5, min(args.rounds, 3), min(args.load, 500)
    return args


def table(records: dict) -> str:
    lines = ["", "policy       req/s x1  req/s x8  tok/s x1  tok/s x8  8 / 1   mean batch (x8)"]
    for r in records["scaling"]:
        lines.append(f"{r['policy']:11s} {r['requests_per_s_1']:9.2f} {r['requests_per_s_8']:9.2f} "
                     f"{r['tokens_per_s_1']:9.1f} {r['tokens_per_s_8']:9.1f} {r['ratio_8_over_1']:6.2f}x "
                     f"{r['mean_batch_8']:8.2f}")
    for img in records["image"]:
        cache = "on" if img["prefix_cache"] else "off"
        lines.append(f"one image question, {img['max_tokens']} tokens, prefix cache {cache}: {img['requests_per_s_1']} "
                     f"req/s x1, {img['requests_per_s_8']} req/s x8: {img['ratio_8_over_1']}x (median of "
                     f"{img['rounds']} alternated rounds, {img['ratio_range'][0]}-{img['ratio_range'][1]}x; load "
                     f"average {img['load_average'][0]} -> {img['load_average'][1]})")
    lat = records["latency"]
    lines.append(f"p50 latency, {lat['completion_tokens']} tokens: endpoint {lat['p50_ms']['endpoint']} ms, "
                 f"in-process generate {lat['p50_ms']['generate']} ms, engine {lat['p50_ms']['engine']} ms; "
                 f"endpoint / generate = {lat['ratio_endpoint_over_generate']}")
    if load_ := records.get("load"):
        lines.append(f"load: {load_['requests']} requests x{load_['concurrency']} in {load_['seconds']} s "
                     f"({load_['requests_per_s']} req/s), 5xx: {load_['responses_5xx']}, malformed "
                     f"{load_['malformed']} -> 4xx with a message: {load_['malformed_4xx_with_message']}, RSS "
                     f"{load_['rss_mb_before']} -> {load_['rss_mb_after']} MB, alive: {load_['alive_after']}")
        lines.append(f"statuses: {load_['statuses']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.in_process_worker:
        return in_process_worker(args.model_dir, args.tokens)
    torch.set_num_threads(1)
    emit("machine", **machine_info(), server_threads=1)
    records: dict = {"scaling": []}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        checkpoint = args.model_dir or tiny_checkpoint(root)
        chat = OmniChat.load(checkpoint)
        no_eos = {str(i): -100 for i in chat.stop_ids}
        records["image"] = []
        for policy in ("continuous", "dynamic"):
            server = start_server(checkpoint, root / policy, {"batching": {"policy": policy, "prefix_cache": False}})
            try:
                records["scaling"].append(scaling(server, policy, args.requests, args.tokens, no_eos))
                if policy == "continuous":
                    records["image"].append(image_question_scaling(server, args.requests, args.rounds, False))
                    records["latency"] = latency(server, checkpoint, args.reps, args.tokens)
                    if args.load:
                        records["load"] = load(server, args.load, args.concurrency)
            finally:
                server.stop()
        server = start_server(checkpoint, root / "prefix-cache", {"batching": {"prefix_cache": True}})
        try:
            records["image"].insert(0, image_question_scaling(server, args.requests, args.rounds, True))
        finally:
            server.stop()
    emit("done")
    print(table(records))


if __name__ == "__main__":
    main()
