"""Compose memory benchmark: peak RSS of `omni model compose` over a synthetic set of sharded
Hugging Face checkpoints (a Qwen2 LLM, a two-tower SigLIP, a Whisper), divided by the bytes of the
checkpoint it writes. The goal is <= 1.3: the model is built on the meta device and every tensor
is read straight into place, so about one copy of the weights is ever held.

    make bench                                        # runs this after the data benchmark
    .venv/bin/python -m benchmarks.bench_compose      # ~0.97B parameters in bf16: ~2 min on 2 cores
    .venv/bin/python -m benchmarks.bench_compose --hidden 1024 --layers 24   # ~0.44B

The compose runs in a fresh process (its own peak RSS, read from the kernel's VmHWM, is the whole
process: Python, torch and transformers included, ~0.4 GiB before anything is composed; the
growth during compose is printed too). Prints one JSON object per line (`"kind"`:
machine, parts, compose, done), then a line with the ratio. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipConfig, SiglipModel, WhisperConfig
from transformers import WhisperForConditionalGeneration as Whisper

from benchmarks.bench_data import emit, machine_info
from model.text.tokenizer import BASE_CORPUS, train_tokenizer

SHARD_BYTES = 200 * 2**20
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def write_sharded(model_cls, config, folder: Path, dtype: torch.dtype) -> dict:
    """Random weights with `model_cls`'s names and shapes, as HF shards + index (never all in memory)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in model_cls(config).state_dict().items()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    shards, current, size, total = [], {}, 0, 0
    for key, shape in [*shapes.items(), (None, None)]:
        if key is None or (current and size + _nbytes(shape, dtype) > SHARD_BYTES):
            shards.append(current)
            save_file(current, folder / f"shard-{len(shards):05d}.safetensors", metadata={"format": "pt"})
            current, size = {}, 0
            if key is None:
                break
        current[key] = (torch.randn(shape) * 0.02).to(dtype)
        size += _nbytes(shape, dtype)
        total += _nbytes(shape, dtype)
    weight_map = {k: f"shard-{i + 1:05d}.safetensors" for i, shard in enumerate(shards) for k in shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    return {"folder": folder.name, "tensors": len(shapes), "shards": len(shards), "bytes": total}


def _nbytes(shape, dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def make_parts(root: Path, hidden: int, layers: int, dtype: torch.dtype) -> dict:
    llm = Qwen2Config(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                      max_position_embeddings=4096, eos_token_id=2)
    vision = SiglipConfig(vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                         "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
                          text_config={"vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
                                       "num_hidden_layers": 1, "num_attention_heads": 4, "pad_token_id": 1,
                                       "bos_token_id": 2, "eos_token_id": 3})
    audio = WhisperConfig(vocab_size=1000, num_mel_bins=80, d_model=512, encoder_layers=6, encoder_attention_heads=8,
                          encoder_ffn_dim=2048, decoder_layers=1, decoder_attention_heads=8, decoder_ffn_dim=512,
                          pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    parts = {"llm": write_sharded(Qwen2ForCausalLM, llm, root / "llm", dtype),
             "vision": write_sharded(SiglipModel, vision, root / "vision", dtype),
             "audio": write_sharded(Whisper, audio, root / "audio", dtype)}
    train_tokenizer(BASE_CORPUS * 10, 1000).save_pretrained(root / "llm")
    return parts


CHILD = """
import json, sys, time
from pathlib import Path
from model.nn.compose import compose
from components.config import load_config

def rss(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) * 1024

root = Path(sys.argv[1])
cfg = load_config(["model=hf", *(f"model.init.{p}={root / p}" for p in ("llm", "vision", "audio"))])
before = rss("VmRSS")
start = time.perf_counter()
report = compose(cfg.model, root / "omni", max_shard_size="2GB")
seconds = time.perf_counter() - start
written = sum(p.stat().st_size for p in (root / "omni").glob("*.safetensors"))
print(json.dumps({"peak_rss": rss("VmHWM"), "rss_before_compose": before, "seconds": round(seconds, 1),
                  "checkpoint_bytes": written, "report": report}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048, help="LLM width (2048 x 16 layers: ~850M LLM parameters)")
    ap.add_argument("--layers", type=int, default=16, help="LLM layers")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the synthetic checkpoints")
    args = ap.parse_args()
    emit("machine", **machine_info())
    with tempfile.TemporaryDirectory(prefix="bench-compose-") as tmp:
        root = Path(tmp)
        parts = make_parts(root, args.hidden, args.layers, DTYPES[args.dtype])
        emit("parts", dtype=args.dtype, **parts)
        out = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        result = json.loads(out.stdout.strip().splitlines()[-1])
    params = sum(result["report"][p]["parameters_loaded"] for p in ("llm", "vision", "audio"))
    ratio = result["peak_rss"] / result["checkpoint_bytes"]
    growth = (result["peak_rss"] - result["rss_before_compose"]) / result["checkpoint_bytes"]
    emit("compose", parameters_loaded=params, ratio_peak_rss=round(ratio, 3), ratio_rss_growth=round(growth, 3),
         **{k: v for k, v in result.items() if k != "report"})
    emit("done", loadavg_1_5_15=[round(x, 2) for x in os.getloadavg()])
    gib = 2**30
    print(f"\ncompose: {params / 1e6:.0f}M parameters loaded from {sum(p['shards'] for p in parts.values())} "
          f"{args.dtype} shards in {result['seconds']} s; wrote {result['checkpoint_bytes'] / gib:.2f} GiB")
    print(f"peak RSS {result['peak_rss'] / gib:.2f} GiB / checkpoint bytes = {ratio:.2f} (goal <= 1.3); "
          f"RSS growth during compose / checkpoint bytes = {growth:.2f} "
          f"(process before compose: {result['rss_before_compose'] / gib:.2f} GiB of Python, torch, transformers)")


if __name__ == "__main__":
    main()
