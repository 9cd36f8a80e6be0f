"""The command inside a stage's TrainJob: one process per GPU, started by torchrun.

    torchrun -m components.train_entry --staging s3://bucket/trainjobs/JOB --stage sft

Reads what `components.cluster.trainjob.run_stage` staged (config.json, inputs/data, inputs/init and any
extra inputs), runs the very same `components.steps.training.train` as a single-machine task (DeepSpeed
takes RANK/WORLD_SIZE/MASTER_ADDR from torchrun). The data set is not downloaded: every rank streams
its share of the shards (and their media) straight from `inputs/data` in the staging store; only the
checkpoint and the small extra inputs are fetched, once per node. Every rank trains; only global rank 0 saves the
checkpoint (with its record and report) and uploads it with the summary to `output/` for the
waiting KFP task. The other ranks exit when training ends.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from components.cluster.trainjob import local_workdir
from components.config import parse_task_config
from model import runtime
from model.storage import Store, open_store

READY = ".inputs-ready"
DATA = "data"  # streamed by the reader, never downloaded


def _fetch_inputs(store: Store, dest: Path, local_rank: int, timeout_s: float = 3600) -> None:
    """One download per node: local rank 0 fetches, the node's other ranks wait for its marker."""
    marker = dest / READY
    if local_rank == 0:
        for key in sorted({k.split("/", 2)[1] for k in store.list("inputs/")} - {DATA}):
            store.download_dir(f"inputs/{key}", dest / key)
        marker.touch()
        return
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"local rank 0 did not finish downloading inputs to {dest} in {timeout_s:.0f}s")
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.train_entry", description=__doc__.split("\n\n")[0])
    parser.add_argument("--staging", required=True, help="the job's staging URI (s3://... or a shared path)")
    parser.add_argument("--stage", required=True, help="stage name, e.g. sft")
    parser.add_argument("--checkpoints", type=Path, help="shared folder for the resumable DeepSpeed state "
                        "(the TrainJob's checkpoint volume): a restarted job resumes from it")
    args = parser.parse_args(argv)
    where = runtime.ranks()
    rank, local_rank = where.rank, where.local_rank

    store = open_store(args.staging)
    cfg = parse_task_config(store.read_bytes("config.json").decode())
    work = local_workdir()
    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    _fetch_inputs(store, inputs, local_rank)

    from components.steps.training import train  # torch/deepspeed: import after the cheap checks
    from model.training.distributed import leave_group_at_exit

    # Each rank writes its own folder: ranks on one node share the filesystem.
    out_dir = work / f"out-rank{rank}"
    sft_filter = inputs / "sft_filter"
    result = train(cfg, args.stage, store.uri(f"inputs/{DATA}"), inputs / "init", out_dir,
                   progress=rank == 0, sft_filter_dir=sft_filter if sft_filter.is_dir() else None,
                   checkpoint_dir=args.checkpoints)
    leave_group_at_exit()
    if rank == 0:  # the only rank steps.train saved a checkpoint on (runtime.ranks().primary)
        store.upload_dir(out_dir, "output/model")
        store.write_bytes("output/result.json", json.dumps(result, default=float).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
