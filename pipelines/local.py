"""Run the whole DAG on this machine with `kfp.local` (embedded mode: the current interpreter,
MLflow on a sqlite file, artifacts under run.workdir).

kfp.local's own task cache is on by default (`cache=False`: `omni pipeline run --no-cache`): a task
whose inputs equal an earlier run's is not run again, its outputs are reused and the log says
"cache hit" for it. Tasks that talk to MLflow or the cluster are never cached (pipelines/dag.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from kfp import local

from components.config import OmniConfig
from pipelines.dag import build_pipeline


def resolve_local(cfg: OmniConfig) -> OmniConfig:
    """Pin relative paths to absolute ones so every step process sees the same workdir."""
    resolved = cfg.model_copy(deep=True)
    resolved.run.workdir = str(cfg.workdir())
    return resolved


@contextlib.contextmanager
def cache_decisions_logged() -> Iterator[None]:
    """Show kfp.local's cache decisions ("Task sft cache hit", "... missing artifact ... cache miss"):
    it logs them at INFO outside the block where it shows its other task lines, so with the root
    logger at its default level they never appear."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s", "%H:%M:%S"))
    handler.addFilter(lambda record: "kfp/local/" in Path(record.pathname).as_posix())
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(min(level or logging.WARNING, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def run_local(cfg: OmniConfig, data_uri: str | Path, cache: bool = True, overrides: list[str] | None = None) -> dict:
    """Run the pipeline to the end (compiled with `cfg`, run with `overrides`); returns its outputs:
    the registered version, the gate's verdict and the evaluation summary."""
    cfg = resolve_local(cfg)
    root = Path(cfg.run.workdir) / "pipeline_root"
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
               enable_caching=cache, cache_root=str(Path(cfg.run.workdir) / "kfp-cache"))
    pipeline = build_pipeline(cfg)
    with cache_decisions_logged(), warnings.catch_warnings():
        # The tasks run in this interpreter on purpose (the images are the cluster's): kfp.local's
        # warning about each task's non-Python image says nothing here, 18 times a run.
        warnings.filterwarnings("ignore", "You may be attemping to run a task that uses custom", RuntimeWarning)
        task = pipeline(data_uri=str(Path(data_uri).resolve()), overrides=list(overrides or []))
    out = dict(task.outputs)
    return {"version": out["version"], "verdict": out["verdict"], "evaluation": json.loads(out["evaluation"])}


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.local CONFIG_JSON DATA --out RESULT_JSON [--no-cache]`: run_local in a
    process of its own (the demo follows its log), the outputs written to RESULT_JSON."""
    import argparse

    from components.config import parse_config

    p = argparse.ArgumentParser(prog="python -m pipelines.local", description=main.__doc__)
    p.add_argument("config", type=Path, help="the resolved config as JSON")
    p.add_argument("data", help="records: a folder or comma-separated JSONL files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-cache", action="store_true")
    args = p.parse_args(argv)
    result = run_local(parse_config(args.config.read_text()), args.data, cache=not args.no_cache)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
