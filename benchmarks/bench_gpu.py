"""Serving and training on an accelerator, measured against the hardware: `make bench-gpu`.

    python -m benchmarks.bench_gpu --size 1.5b                 # both parts, on a GPU
    python -m benchmarks.bench_gpu --size tiny --part serve    # CPU smoke (CI runs this)

Prints JSON lines, one per measurement: first `{"kind": "machine", ...}`, then the parts'
records (`"kind": "serve"` from benchmarks.gpu_serve, `"kind": "train"` from benchmarks.gpu_train),
then a table. Models are built from a named size with fresh weights (nothing is downloaded):
`tiny` runs anywhere in seconds, `1.5b` is Qwen2-1.5B + SigLIP-so400m + Whisper-large-v3,
`7b` is the paper's size (conf/model/omni-7b.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import torch  # noqa: E402

from benchmarks.gpu_sizes import SIZES  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402

PARTS = ("serve", "train", "all")
Emit = Callable[..., dict]


def emit(kind: str, **fields) -> dict:
    record = {"kind": kind, **fields}
    print(json.dumps(record), flush=True)
    return record


def machine_info() -> dict:
    """What the figures were measured on: the accelerator (if any), the CPU, the software."""
    info = {"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "device": "cpu", "gpu": None, "gpu_mem_gib": None, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device="cuda", gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1))
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="tiny", help="model shape, fresh weights (default tiny)")
    p.add_argument("--part", choices=PARTS, default="all", help="serving, training, or both (default)")
    p.add_argument("overrides", nargs="*", help="config overrides the serving part runs with, as `omni serve` takes "
                                                "them, e.g. serving.batching.prefill_chunk=1024")
    args = p.parse_args(argv)
    machine = machine_info()
    rows: list[dict] = []
    if args.part in ("train", "all"):
        from benchmarks import gpu_train
        machine.update(gpu_train.matmul_peak())  # the training part's yardstick, measured in this run
    emit("machine", **machine)
    if args.part in ("serve", "all"):
        from benchmarks import gpu_serve
        rows += gpu_serve.run(args.size, emit, args.overrides)
    if args.part in ("train", "all"):
        from benchmarks import gpu_train
        rows += gpu_train.run(args.size, emit, machine)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """The records as a table: one line each, the fields in the order they were emitted."""
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
