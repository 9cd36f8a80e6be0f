"""`make bench-gpu`'s serving part on the tiny size, on the CPU CI runs on: the contract other tools read
(JSON lines: the machine first, one `serve` record per stream count, then the table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_serve_part_prints_the_machine_then_one_record_per_stream_count_then_a_table():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--size", "tiny", "--part", "serve"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records[0]["kind"] == "machine" and records[0]["device"] == "cpu"
    serve = [r for r in records if r["kind"] == "serve"]
    assert [r["streams"] for r in serve] == [1, 8, 32, 64]
    for r in serve:
        assert r["tokens_per_s"] > 0 and 0 < r["ttft_p50_ms"] <= r["ttft_p95_ms"] and r["peak_mem_gib"] is None
    assert {r["media"] for r in records if r["kind"] == "serve_ttft"} == {"image", "audio"}
    assert [r["streams"] for r in records if r["kind"] == "serve_reference"] == [1, 8, 32, 64]
    table = [line for line in lines if line.startswith("kind=serve ")]
    assert len(table) == 4 and lines.index(table[0]) > len(records) - 1  # the table after every JSON line


def test_serve_part_runs_the_engine_with_the_serving_config():
    """The benchmark's engine takes the tree's `serving.batching` (overrides included), widened to its 64 streams."""
    from benchmarks.gpu_serve import engine_config

    config = engine_config("tiny", ["serving.batching.prefill_chunk=64", "serving.batching.cuda_graphs=false"])
    assert (config.prefill_chunk, config.cuda_graphs) == (64, False)
    assert (config.max_batch_size, config.max_context) == (64, 1024)  # the widest round; the tiny size's context
    assert engine_config("1.5b", ["serving.batching.max_context=2048"]).max_context == 2048
