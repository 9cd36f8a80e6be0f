"""Training on an accelerator, measured against its own matmul peak: the `--part train` of bench_gpu.

    python -m benchmarks.bench_gpu --size 1.5b --part train   # full SFT, packed and padded
    python -m benchmarks.bench_gpu --size 7b --part train     # frozen-LLM alignment, LoRA SFT
    python -m benchmarks.bench_gpu --size tiny --part train   # every run on a CPU in seconds (CI)

`matmul_peak()` measures the yardstick in the same run (bf16 8192^3 on CUDA; a small fp32 GEMM on a
CPU) and adds the datasheet's dense bf16 peak when the GPU is known. `run()` trains fresh-weight
models of the named size through `train_stage` (DeepSpeed ZeRO-2, the stage's own collate route and
attention kernel: `model.attn_implementation: auto`) on a synthetic mixture (40% text, 30% image,
20% audio, 10% both; benchmarks.bench_training) and emits one `{"kind": "train", ...}` record per run:

- `real_tokens_per_s`: non-padding LLM tokens per second over the timed steps (the first is left out);
- `utilisation`: the work really done per second / the measured peak (`utilisation_datasheet`: / the
  datasheet's). Work = 6·N·D for trained weights, 4·N·D through a frozen module that gradients pass
  (a frozen LLM below trainable projectors, the LLM under LoRA), 2·N·D forward-only (frozen encoders),
  plus LoRA's adapters and attention over real tokens (bench_training.FlopModel, `passes_for`);
- `padding_fraction`: positions computed that hold no token; `data_wait_fraction`: the share of the
  run the host spent waiting for the loader's batches (near 0: the loader keeps up); `peak_mem_gib`:
  the CUDA allocator's peak over the run (null on a CPU), next to `plan_gib`, the memory plan's estimate
  (model.nn.plan, rows of max_seq_len), and whether activation checkpointing ran (the plan decides:
  the stages say `auto`).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import torch

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

from benchmarks.bench_training import (  # noqa: E402
    TRAINABLE,
    FlopModel,
    _round,
    adapter_flops,
    build_samples,
    data_setup,
    measured_run,
    passes_for,
)
from benchmarks.gpu_sizes import size_config  # noqa: E402
from model import runtime  # noqa: E402
from model.config import LoraConfig, ModelConfig, StageConfig  # noqa: E402
from model.data.packing import pack  # noqa: E402
from model.nn.hf import embedding_rows  # noqa: E402
from model.nn.omni import OmniModel  # noqa: E402
from model.nn.plan import adapter_parameters, plan_stage  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), by name fragment:
# the first fragment found in the device name wins.
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.1))
PROJECTORS = ["vision_projector", "audio_projector"]  # the mixture has no video: its projector would idle


@dataclass(frozen=True)
class Size:
    runs: tuple[str, ...]
    pool: int  # distinct samples
    rows: int  # packed rows of max_seq_len per micro-batch
    steps: int  # optimizer steps per run, the first untimed
    padded: int | None = None  # samples per padded micro-batch; None: as many as hold the packed rows' real tokens


SIZES = {
    "tiny": Size(("sft_packed", "sft_padded", "align_frozen", "lora_sft"), 24, 2, 2),
    # 4 padded samples: the baseline's padded run (a rate is compared; 4 samples fit without checkpointing)
    "1.5b": Size(("sft_packed", "sft_padded"), 96, 2, 8, padded=4),
    "7b": Size(("align_frozen", "lora_sft"), 96, 2, 6),
}


def datasheet_tflops(gpu: str | None) -> float | None:
    return next((t for fragment, t in DATASHEET_BF16_TFLOPS if gpu and fragment in gpu), None)


def matmul_peak() -> dict:
    """The machine's matmul rate, measured now: bf16 8192^3 on CUDA (best of 5 timings of 10
    back-to-back products), fp32 512^3 on a CPU (quick: the smoke run's yardstick)."""
    if not torch.cuda.is_available():
        from benchmarks.bench_training import gemm_flops

        n, rate = 512, gemm_flops(512, seconds=0.3)
        return {"matmul_dtype": "float32", "matmul_n": n, "matmul_tflops": _round(rate / 1e12),
                "datasheet_tflops": None}
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000 / 10)
    del a, b
    torch.cuda.empty_cache()
    return {"matmul_dtype": "bfloat16", "matmul_n": n, "matmul_tflops": _round(2 * n**3 / best / 1e12),
            "datasheet_tflops": datasheet_tflops(torch.cuda.get_device_name())}


def stage_for(run: str, rows: int, padded_batch: int, steps: int) -> StageConfig:
    """The run's stage: which modules train, packed or padded; activation checkpointing as the plan says."""
    trainable = {"sft_packed": TRAINABLE, "sft_padded": TRAINABLE, "align_frozen": PROJECTORS,
                 "lora_sft": ["llm", *PROJECTORS]}[run]
    packing = run != "sft_padded"
    return StageConfig(name=run, trainable=trainable, lr=1e-5, data_tasks=["bench"], steps=steps,
                       micro_batch_size=rows if packing else padded_batch, zero_stage=2, packing=packing,
                       activation_checkpointing="auto", lora=LoraConfig(rank=16) if run == "lora_sft" else None)


def fresh_model(cfg: ModelConfig, processor) -> OmniModel:
    """Seeded fresh weights, built on this process's device in its dtype (no host copy of a 7B model)."""
    torch.manual_seed(0)
    with torch.device(runtime.device()):
        model = OmniModel(cfg, embedding_rows(cfg, len(processor.tok)), processor.placeholder_ids)
    return runtime.place(model)


def checkpointing_ran(llm: torch.nn.Module) -> bool:
    """Whether the LLM trained with activation checkpointing (transformers renamed the flag in 5.x)."""
    names = [n for n in ("is_activation_checkpointing", "is_gradient_checkpointing") if hasattr(type(llm), n)]
    return bool(getattr(llm, names[0])) if names else False


def one_run(run: str, cfg: ModelConfig, processor, samples: list, spec: Size, padded_batch: int,
            machine: dict) -> dict:
    """Train one stage on a fresh model and measure it."""
    stage = stage_for(run, spec.rows, padded_batch, spec.steps)
    if run == "align_frozen":  # alignment data pairs media with text: a text-only batch reaches no trainable module
        samples = [s for s in samples if s.pixel_values or s.audio_mel]
    model = fresh_model(cfg, processor)
    flop_model = FlopModel.of(model, processor)
    adapters = adapter_parameters(model.llm, stage.lora) if stage.lora else 0
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in
              ("vision_tower", "vision_projector", "video_projector", "audio_encoder", "audio_projector", "llm")}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    r = measured_run(model, processor, samples, stage, flop_model, passes=passes_for(stage))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    flops = r["train_flops"] + adapter_flops(adapters, r["timed_real_tokens"])
    achieved = flops / r["seconds_timed"]
    checkpointed = checkpointing_ran(model.llm)
    plan = plan_stage(cfg, stage, 2, 1, micro_batch=stage.micro_batch_size, checkpointing=checkpointed,
                      counts=counts, adapters=adapters)
    sheet = machine.get("datasheet_tflops")
    record = {
        "run": run, "size": cfg.name, "real_tokens_per_s": r["real_tokens_per_s"],
        "utilisation": achieved / (machine["matmul_tflops"] * 1e12),
        "utilisation_datasheet": achieved / (sheet * 1e12) if sheet else None,
        "padding_fraction": r["padding_fraction"], "data_wait_fraction": r["data_wait_fraction"],
        "peak_mem_gib": peak, "plan_gib": plan.total_gib,
        "activation_checkpointing": checkpointed, "attn_implementation": model.llm.config._attn_implementation,
        "micro_batch_size": stage.micro_batch_size, "unit": r["unit"], "trainable": stage.trainable,
        "lora_rank": stage.lora.rank if stage.lora else None, "tflops_per_s": achieved / 1e12,
        "real_tokens_per_step": r["real_tokens_per_step"], "step_ms": r["step_ms"],
        "timed_steps": r["timed_steps"], "loss_first": r["loss_first"], "loss_last": r["loss_last"],
    }
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {k: _round(v) for k, v in record.items()}


def run(size: str, emit, machine: dict) -> list[dict]:
    """Every run of `size`, one `{"kind": "train", ...}` record each (emitted as it completes)."""
    import logging

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    spec = SIZES[size]
    cfg, processor, words = data_setup(size_config(size))
    t = time.perf_counter()
    samples = build_samples(processor, cfg, words, spec.pool)
    lengths = [len(s.input_ids) for s in samples]
    rows = pack(samples, cfg.max_seq_len)
    mean_row = sum(lengths) / len(rows)
    padded_batch = spec.padded or max(1, round(spec.rows * mean_row / (sum(lengths) / len(lengths))))
    data = {"samples": len(samples), "sample_tokens": [min(lengths), max(lengths)], "max_seq_len": cfg.max_seq_len,
            "data_seconds": round(time.perf_counter() - t, 1)}
    return [emit("train", **one_run(r, cfg, processor, samples, spec, padded_batch, machine), **data)
            for r in spec.runs]
