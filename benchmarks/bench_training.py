"""Training throughput benchmark: packed vs padded batches, and achieved FLOP/s vs the machine's GEMM rate.

    make bench                                   # default run (a few minutes on 2 cores)
    .venv/bin/python -m benchmarks.bench_training --quick             # smoke run, < 1 minute
    .venv/bin/python -m benchmarks.bench_training --threads 2 --model tiny --skip-flops

Prints one JSON object per line (one per measurement, `"kind"` says which), then a short table.
See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch.utils.data import RandomSampler  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from model.config import ModelConfig, StageConfig  # noqa: E402
from model.data.packing import pack  # noqa: E402
from model.nn.attention import pad_to_bucket  # noqa: E402
from model.nn.hf import embedding_rows  # noqa: E402
from model.nn.omni import OmniModel  # noqa: E402
from model.text.processor import ChatInput, Encoded, OmniProcessor  # noqa: E402
from model.text.tokenizer import train_tokenizer  # noqa: E402
from model.training.recipe import train_stage  # noqa: E402

# The modules that run on this data (no video), all trained, as in the sft / omni_align stages.
TRAINABLE = ["vision_tower", "vision_projector", "audio_encoder", "audio_projector", "llm"]
TOKENIZER_CAP = 8192
SYLLABLES = [c + v for c in "bdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def emit(kind: str, **fields) -> dict:
    record = {"kind": kind, **fields}
    print(json.dumps(record), flush=True)
    return record


# --------------------------------------------------------------------------------------------- machine
def machine_info(threads: int) -> dict:
    cpu = cpu_name()
    import deepspeed
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "threads_requested": threads,
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def gemm_flops(n: int = 1024, seconds: float = 1.0) -> float:
    """fp32 n x n matmul rate, 2 n^3 FLOPs per product: the best single product over `seconds` of
    back-to-back products (best-of, because other processes on a shared machine only slow it down)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.matmul(a, b)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ------------------------------------------------------------------------------------------------ data
def load_cfg(name: str) -> ModelConfig:
    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")))


def make_words(rng: np.random.Generator, count: int) -> list[str]:
    words = {"".join(rng.choice(SYLLABLES, size=rng.integers(1, 5))) for _ in range(count * 2)}
    return sorted(words)[:count]


def synthetic_image(rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        x1, y1 = x0 + int(rng.integers(size // 8, size // 2)), y0 + int(rng.integers(size // 8, size // 2))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(int(x) for x in rng.integers(0, 256, 3)))
    return img


def synthetic_audio(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    tones = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 2000, 3))
    return (0.1 * tones + rng.normal(0, 0.02, t.size)).astype(np.float32)


def build_samples(processor: OmniProcessor, cfg: ModelConfig, words: list[str], count: int,
                  seed: int = 0) -> list[Encoded]:
    """A mix like the sft data: 40% text only, 30% image, 20% audio, 10% image + audio; text of
    varying length, so sample lengths spread ~10x (tiny: ~30 to ~max_seq_len tokens)."""
    rng = np.random.default_rng(seed)
    scale = cfg.max_seq_len / 384  # the tiny config's row length: longer rows, longer texts
    samples: list[Encoded] = []
    while len(samples) < count:
        kind = rng.choice(["text", "image", "audio", "image+audio"], p=[0.4, 0.3, 0.2, 0.1])
        user_words = int(rng.integers(3, 40) * scale)
        answer_words = int(rng.integers(2, 70) * scale)
        user = " ".join(rng.choice(words, user_words))
        answer = " ".join(rng.choice(words, answer_words))
        images = [synthetic_image(rng, 256)] if "image" in kind else []
        audios = [synthetic_audio(rng, float(rng.uniform(1, 8)), cfg.audio.sampling_rate)] if "audio" in kind else []
        tags = "<image>" * len(images) + "<audio>" * len(audios)
        chat = ChatInput(messages=[{"role": "user", "content": tags + user},
                                   {"role": "assistant", "content": answer}], images=images, audios=audios)
        enc = processor.encode(chat)
        if len(enc.input_ids) <= cfg.max_seq_len:
            samples.append(enc)
    return samples


# ----------------------------------------------------------------------------------------------- FLOPs
@dataclass
class FlopModel:
    """Training FLOPs of one sample, from parameter counts (the standard 6·N·D estimate).

    A weight applied at D positions costs 2·N·D FLOPs forward and 4·N·D backward (gradients of the
    activations and of the weights), so 6·N·D to train. Every module is counted at the positions it
    really runs on:

    - LLM: N = decoder layers + lm_head (the input embedding is a lookup, not a matmul), D = the
      sample's real tokens (padding is not useful work and is not counted);
    - vision tower: patch embedding + encoder layers (not the position table, not the pooling head,
      whose output is unused), D = patches per image; vision projector: D = tokens per image;
    - audio encoder: conv1 at every mel frame, conv2 + layers at half the frames; audio projector:
      D = audio tokens of the window.

    Attention adds what 6·N·D misses, the score and value products: per query 2·h·ctx FLOPs for
    QKᵀ and 2·h·ctx for AV forward (h = heads x head_dim = hidden size, ctx = keys it attends to),
    x3 to train: 12·layers·h·ctx. LLM: causal within its own sample, Σ ctx = n(n+1)/2 for n tokens
    (a packed row's masked cross-sample blocks are not useful work); vision and audio encoders:
    bidirectional, ctx = the sequence length.

    Not counted (small): norms, activations, softmax, RoPE, the loss, the optimizer step.

    Stages that freeze modules do less (`passes_for`): a frozen module that gradients must still pass
    through (something upstream of it trains) costs 4·N·D (forward + activation gradients), one that
    only runs forward 2·N·D; attention costs 3x its forward where backward passes, else 1x. LoRA
    adapters are counted apart (`adapter_flops`).
    """

    llm: int
    llm_attn: int  # layers * hidden
    vision: int
    vision_attn: int
    vision_projector: int
    audio_conv1: int
    audio: int
    audio_attn: int
    audio_projector: int
    patches: int
    image_tokens: int
    audio_multiple: int

    @classmethod
    def of(cls, model: OmniModel, processor: OmniProcessor) -> FlopModel:
        def n(module) -> int:
            return sum(p.numel() for p in module.parameters())

        cfg = model.cfg
        vis = getattr(model.vision_tower, "vision_model", model.vision_tower)  # transformers 4 nests it
        llm, enc = model.llm, model.audio_encoder.encoder
        return cls(
            llm=n(llm.model.layers) + llm.lm_head.weight.numel(),
            llm_attn=cfg.llm.num_hidden_layers * cfg.llm.num_attention_heads
            * (cfg.llm.hidden_size // cfg.llm.num_attention_heads),
            vision=n(vis.embeddings.patch_embedding) + n(vis.encoder),
            vision_attn=cfg.vision.num_hidden_layers * cfg.vision.hidden_size,
            vision_projector=n(model.vision_projector),
            audio_conv1=n(enc.conv1),
            audio=n(enc.conv2) + n(enc.layers),
            audio_attn=cfg.audio.encoder_layers * cfg.audio.d_model,
            audio_projector=n(model.audio_projector),
            patches=cfg.vision.grid**2,
            image_tokens=processor.tile_tokens,
            audio_multiple=processor.audio_multiple,
        )

    def sample(self, s: Encoded, passes: dict[str, int] | None = None) -> float:
        """Training FLOPs of one sample; `passes` = N·D multiplier per module (default: 6, all train)."""
        k = {m: 6 for m in UPSTREAM} | (passes or {})
        attn = {m: 12 if k[m] > 2 else 4 for m in k}  # attention has no weights: 3x forward iff backward runs
        n = len(s.input_ids)
        flops = k["llm"] * self.llm * n + attn["llm"] * self.llm_attn * n * (n + 1) / 2
        for _ in s.pixel_values:
            flops += k["vision_tower"] * self.vision * self.patches
            flops += attn["vision_tower"] * self.vision_attn * self.patches**2
            flops += k["vision_projector"] * self.vision_projector * self.image_tokens
        for w in s.audio_mel:
            frames = w.shape[1]
            positions = (frames + 1) // 2
            flops += k["audio_encoder"] * (self.audio_conv1 * frames + self.audio * positions)
            flops += attn["audio_encoder"] * self.audio_attn * positions**2
            flops += k["audio_projector"] * self.audio_projector * (frames // self.audio_multiple)
        return flops


# Which modules feed which: a frozen module passes gradients on when anything upstream of it trains.
UPSTREAM = {"vision_tower": (), "vision_projector": ("vision_tower",), "audio_encoder": (),
            "audio_projector": ("audio_encoder",),
            "llm": ("vision_tower", "vision_projector", "video_projector", "audio_encoder", "audio_projector")}


def passes_for(stage: StageConfig) -> dict[str, int]:
    """N·D multiplier per module in `stage`: 6 trains its weights, 4 only passes gradients through
    (frozen, something upstream trains; the LLM under LoRA too), 2 runs forward only."""
    trains = set(stage.trainable) - ({"llm"} if stage.lora else set())
    out = {}
    for module, upstream in UPSTREAM.items():
        if module in trains:
            out[module] = 6
        else:
            out[module] = 4 if (trains & set(upstream)) or (module == "llm" and stage.lora) else 2
    return out


def adapter_flops(adapter_params: int, tokens: int) -> float:
    """LoRA adapters train at every LLM token: 6·N·D of their own."""
    return 6 * adapter_params * tokens


# ------------------------------------------------------------------------------------------------ runs
def step_batches(items: list, stage: StageConfig) -> list[list]:
    """The items train_stage draws, step by step: the same seeded sampler it builds."""
    sampler = RandomSampler(
        items,
        replacement=True,
        num_samples=stage.steps * stage.grad_accum * stage.micro_batch_size,
        generator=torch.Generator().manual_seed(stage.seed),
    )
    order = [items[i] for i in sampler]
    per_step = stage.grad_accum * stage.micro_batch_size
    return [order[k : k + per_step] for k in range(0, len(order), per_step)]


def layout(stage: StageConfig, steps: list[list], max_seq_len: int, one_row_kernel: str | None = None) -> list[dict]:
    """Per step: real tokens, positions computed (padded width x rows) and the samples, from the
    batches as collated (`collate` pads to the longest sample, `collate_packed` to the fullest row,
    or, for a kernel that takes packed rows as one row, to that kernel's bucket)."""
    out = []
    for step in steps:
        real = positions = 0
        samples: list[Encoded] = []
        for m in range(0, len(step), stage.micro_batch_size):
            micro = step[m : m + stage.micro_batch_size]
            if stage.packing:
                lengths = [sum(len(s.input_ids) for s in row) for row in micro]
                samples += [s for row in micro for s in row]
            else:
                lengths = [len(s.input_ids) for s in micro]
                samples += micro
            real += sum(lengths)
            if stage.packing and one_row_kernel:
                positions += pad_to_bucket(sum(lengths), one_row_kernel)
            else:
                positions += max(lengths) * len(lengths)
        out.append({"real": real, "positions": positions, "samples": samples})
    return out


def timed_run(
    model: OmniModel,
    init_state: dict,
    processor: OmniProcessor,
    samples: list[Encoded],
    stage: StageConfig,
    flop_model: FlopModel | None,
    skip: int = 1,
) -> dict:
    """Train from `init_state`; throughput over the steps after the first `skip` (the first step
    also pays for the loader start-up), timed between on_step callbacks."""
    model.load_state_dict(init_state)
    return measured_run(model, processor, samples, stage, flop_model, skip)


def measured_run(model: OmniModel, processor: OmniProcessor, samples: list[Encoded], stage: StageConfig,
                 flop_model: FlopModel | None, skip: int = 1, passes: dict[str, int] | None = None) -> dict:
    """`train_stage` on `model` as it is, timed as `timed_run` says; FLOPs with `passes` (FlopModel)."""
    stamps: list[float] = []
    result = train_stage(  # a report every step: each on_step then comes when its step has run
        model, processor, samples, stage, progress=False, on_step=lambda step, loss: stamps.append(time.perf_counter()),
        report_every=1,
    )
    items = pack(samples, model.cfg.max_seq_len) if stage.packing else samples
    kernel = model.llm.config._attn_implementation if model.varlen else None
    steps = layout(stage, step_batches(items, stage), model.cfg.max_seq_len, kernel)
    real_total = sum(s["real"] for s in steps)
    if real_total != result.tokens:
        raise RuntimeError(f"replayed batches hold {real_total} real tokens, train_stage counted {result.tokens}")
    timed = steps[skip:]
    seconds = stamps[-1] - stamps[skip - 1] if skip else result.seconds
    real = sum(s["real"] for s in timed)
    positions = sum(s["positions"] for s in steps)
    out = {
        "packing": stage.packing,
        "steps": stage.steps,
        "timed_steps": len(timed),
        "micro_batch_size": stage.micro_batch_size,
        "unit": "packed rows" if stage.packing else "samples",
        "samples_per_step": sum(len(s["samples"]) for s in steps) / len(steps),
        "real_tokens_per_step": real_total / len(steps),
        "positions_per_step": positions / len(steps),
        "padding_fraction": 1 - real_total / positions,
        "seconds_timed": seconds,
        "seconds_all_steps": result.seconds,
        "data_wait_fraction": result.data_wait_seconds / result.seconds,
        "real_tokens_per_s": real / seconds,
        "positions_per_s": sum(s["positions"] for s in timed) / seconds,
        "step_ms": 1000 * seconds / len(timed),
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
    }
    if flop_model is not None:
        flops = sum(flop_model.sample(x, passes) for s in timed for x in s["samples"])
        out.update(train_flops=flops, achieved_flops_per_s=flops / seconds, timed_real_tokens=real)
    return out


def stage_for(name: str, packing: bool, steps: int, micro_batch_size: int) -> StageConfig:
    # Everything but `packing` (and the micro-batch unit it implies) is the same for both runs.
    return StageConfig(
        name=name,
        trainable=TRAINABLE,
        lr=1e-3,
        data_tasks=["bench"],
        steps=steps,
        micro_batch_size=micro_batch_size,
        warmup_steps=2,
        zero_stage=2,
        packing=packing,
    )


def setup(model_name: str, pool: int, seed: int = 0):
    cfg, processor, words = data_setup(load_cfg(model_name), seed)
    torch.manual_seed(seed)
    model = OmniModel(cfg, embedding_rows(cfg, len(processor.tok)), processor.placeholder_ids)
    samples = build_samples(processor, cfg, words, pool, seed)
    return cfg, processor, model, samples


def data_setup(cfg: ModelConfig, seed: int = 0) -> tuple[ModelConfig, OmniProcessor, list[str]]:
    """The config, a processor whose BPE tokenizer is trained on random pseudo-words (at most
    TOKENIZER_CAP entries: a corpus this small has no more merges; the LLM's embedding keeps the
    config's vocabulary, `embedding_rows`) and the words the samples are made of."""
    rng = np.random.default_rng(seed)
    words = make_words(rng, 4000)
    corpus = [" ".join(rng.choice(words, 50)) for _ in range(2000)]
    tok = train_tokenizer(corpus, min(cfg.tokenizer.vocab_size, TOKENIZER_CAP))
    return cfg, OmniProcessor(tok, cfg), words


def packed_rows_for(samples: list[Encoded], max_seq_len: int, padded_batch: int) -> tuple[int, float]:
    """Packed rows per step holding about as many real tokens as `padded_batch` samples."""
    bins = pack(samples, max_seq_len)
    mean_sample = sum(len(s.input_ids) for s in samples) / len(samples)
    mean_row = sum(len(s.input_ids) for s in samples) / len(bins)
    return max(1, round(padded_batch * mean_sample / mean_row)), mean_row


def bench_packing(args) -> dict:
    cfg, processor, model, samples = setup(args.model, args.pool)
    lengths = [len(s.input_ids) for s in samples]
    rows, mean_row = packed_rows_for(samples, cfg.max_seq_len, args.batch)
    emit(
        "data",
        model=cfg.name,
        samples=len(samples),
        max_seq_len=cfg.max_seq_len,
        vocab=len(processor.tok),
        len_min=min(lengths),
        len_median=int(np.median(lengths)),
        len_mean=round(float(np.mean(lengths)), 1),
        len_max=max(lengths),
        with_image=sum(bool(s.pixel_values) for s in samples),
        with_audio=sum(bool(s.audio_mel) for s in samples),
        packed_rows=len(pack(samples, cfg.max_seq_len)),
        mean_tokens_per_packed_row=round(mean_row, 1),
        micro_batch={"padded_samples": args.batch, "packed_rows": rows},
    )
    init = copy.deepcopy(model.state_dict())
    flop_model = FlopModel.of(model, processor)
    t = time.perf_counter()
    for packing in (False, True):  # warm-up: DeepSpeed init / op load, allocator, first-call paths
        train_stage(
            model,
            processor,
            samples,
            stage_for("warmup", packing, args.warmup, rows if packing else args.batch),
            progress=False,
        )
    emit("warmup", steps_each=args.warmup, seconds=round(time.perf_counter() - t, 2))
    results = {False: [], True: []}
    for rep in range(args.repeats):  # alternate, so a load spike from elsewhere hits both alike
        for packing in (False, True) if rep % 2 == 0 else (True, False):
            stage = stage_for("bench", packing, args.steps, rows if packing else args.batch)
            r = timed_run(model, init, processor, samples, stage, flop_model)
            r["repeat"] = rep
            results[packing].append(r)
            emit(
                "train", model=cfg.name, **{k: _round(v) for k, v in r.items()}, loadavg_1m=round(os.getloadavg()[0], 2)
            )
    best = {p: max(rs, key=lambda r: r["real_tokens_per_s"]) for p, rs in results.items()}
    summary = emit(
        "packing_speedup",
        model=cfg.name,
        padded_real_tokens_per_s=_round(best[False]["real_tokens_per_s"]),
        packed_real_tokens_per_s=_round(best[True]["real_tokens_per_s"]),
        ratio_packed_over_padded=_round(best[True]["real_tokens_per_s"] / best[False]["real_tokens_per_s"]),
        padded_padding_fraction=_round(best[False]["padding_fraction"]),
        packed_padding_fraction=_round(best[True]["padding_fraction"]),
        best_of=args.repeats,
    )
    return {"best": best, "summary": summary}


def bench_flops(args) -> dict:
    cfg, processor, model, samples = setup("small", args.small_pool)
    rows, _ = packed_rows_for(samples, cfg.max_seq_len, args.small_batch)
    flop_model = FlopModel.of(model, processor)
    init = copy.deepcopy(model.state_dict())
    stage = stage_for("flops", args.small_packing, args.small_steps, rows if args.small_packing else args.small_batch)
    train_stage(
        model, processor, samples, stage_for("warmup", args.small_packing, 1, stage.micro_batch_size), progress=False
    )
    r = timed_run(model, init, processor, samples, stage, flop_model)
    counts = {k: getattr(flop_model, k) for k in ("llm", "vision", "vision_projector", "audio", "audio_projector")}
    return {
        "model": cfg.name,
        "packing": args.small_packing,
        "timed_steps": r["timed_steps"],
        "micro_batch_size": r["micro_batch_size"],
        "unit": r["unit"],
        "matmul_params": counts,
        "real_tokens_per_step": _round(r["real_tokens_per_step"]),
        "real_tokens_per_s": _round(r["real_tokens_per_s"]),
        "padding_fraction": _round(r["padding_fraction"]),
        "train_flops": _round(r["train_flops"]),
        "seconds": _round(r["seconds_timed"]),
        "achieved_flops_per_s": _round(r["achieved_flops_per_s"]),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def _round(v):
    return float(f"{v:.4g}") if isinstance(v, float) else v


def table(info: dict, gemms: list[float], packing: dict, flops: dict | None) -> str:
    best, s = packing["best"], packing["summary"]
    lines = [
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
        f"deepspeed {info['deepspeed']}, load avg at start {info['loadavg_1_5_15']}",
        f"GEMM fp32 1024^3: {max(gemms) / 1e9:.1f} GFLOP/s (each measurement: "
        f"{', '.join(f'{g / 1e9:.1f}' for g in gemms)})",
        "",
        f"{'model ' + s['model']:<14}{'micro-batch':>18}{'real tok/step':>15}{'padding':>9}"
        f"{'real tok/s':>12}{'ms/step':>9}{'GFLOP/s':>9}",
    ]
    for packing_on, name in ((False, "padded"), (True, "packed")):
        r = best[packing_on]
        lines.append(
            f"{name:<14}{str(r['micro_batch_size']) + ' ' + r['unit']:>18}{r['real_tokens_per_step']:>15.0f}"
            f"{r['padding_fraction']:>9.1%}{r['real_tokens_per_s']:>12.0f}{r['step_ms']:>9.0f}"
            f"{r['achieved_flops_per_s'] / 1e9:>9.2f}"
        )
    lines.append(
        f"packed / padded real tokens/s: {s['ratio_packed_over_padded']:.2f}x "
        f"(best of {s['best_of']}, {best[False]['timed_steps']} timed steps each)"
    )
    if flops:
        lines.append(
            f"small ({'packed' if flops['packing'] else 'padded'}): {flops['achieved_flops_per_s'] / 1e9:.1f} "
            f"GFLOP/s achieved = {flops['fraction_of_gemm']:.1%} of GEMM peak "
            f"({flops['real_tokens_per_s']:.0f} real tok/s, {flops['timed_steps']} timed steps)"
        )
    return "\n".join(lines)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--model", choices=["tiny", "small"], default="tiny", help="config for packed vs padded")
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, < 1 minute")
    p.add_argument("--steps", type=int, help="optimizer steps per timed run (default 20, quick 5)")
    p.add_argument("--warmup", type=int, help="untimed steps per mode before timing (default 3, quick 2)")
    p.add_argument("--repeats", type=int, help="timed runs per mode, alternating, best kept (default 2, quick 1)")
    p.add_argument("--batch", type=int, default=8, help="padded micro-batch (samples); packed rows are matched to it")
    p.add_argument("--pool", type=int, default=256, help="distinct samples in the data")
    p.add_argument("--skip-flops", action="store_true", help="skip the small-config FLOP/s measurement")
    p.add_argument("--small-steps", type=int, help="steps of the small-config run (default 6, quick 2)")
    p.add_argument("--small-batch", type=int, default=4, help="small config: padded-sample equivalent per step")
    p.add_argument("--small-pool", type=int, default=64)
    p.add_argument("--small-padded", dest="small_packing", action="store_false",
                   help="measure the small config with padded batches instead of packed")
    args = p.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    args.warmup = args.warmup or (2 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.small_steps = args.small_steps or (2 if args.quick else 6)
    if args.quick:
        args.pool = min(args.pool, 96)
        args.small_pool = min(args.small_pool, 16)
    return args


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)

    start = time.perf_counter()
    info = emit("machine", **machine_info(args.threads))
    gemm_seconds = 0.5 if args.quick else 2.0
    gemms = []

    def measure_gemm(when: str) -> None:
        gemms.append(gemm_flops(seconds=gemm_seconds))
        emit("gemm", n=1024, dtype="float32", flops_per_s=_round(gemms[-1]), when=when)

    measure_gemm("start")
    packing = bench_packing(args)
    flops = None
    if not args.skip_flops:
        measure_gemm("before small")
        flops = bench_flops(args)
        measure_gemm("after small")
        # The best GEMM seen in this run is the peak: the fraction is then a lower bound.
        flops = emit(
            "flops",
            **flops,
            gemm_flops_per_s=_round(max(gemms)),
            fraction_of_gemm=_round(flops["achieved_flops_per_s"] / max(gemms)),
        )
    emit("done", seconds=round(time.perf_counter() - start, 1), loadavg_1_5_15=[round(x, 2) for x in os.getloadavg()])
    print()
    print(table(info, gemms, packing, flops))


if __name__ == "__main__":
    main()
