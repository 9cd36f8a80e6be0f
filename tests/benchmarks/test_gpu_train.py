"""`python -m benchmarks.bench_gpu --part train`: its JSON-lines contract on the tiny size (a CPU
smoke run of every training run), and the FLOP accounting behind `utilisation`."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from benchmarks import gpu_train
from benchmarks.bench_training import FlopModel, passes_for
from model.nn.plan import parameter_counts

CONTRACT = ("run", "real_tokens_per_s", "utilisation", "padding_fraction", "peak_mem_gib")


@pytest.fixture(scope="module")
def records():
    """One smoke run serves every test here (module scope: capsys is per test, so stdout is redirected)."""
    from benchmarks import bench_gpu

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_gpu.main(["--size", "tiny", "--part", "train"])
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def test_train_part_prints_the_machine_then_one_record_per_run(records):
    machine, *train = records
    assert machine["kind"] == "machine" and machine["matmul_tflops"] > 0 and machine["matmul_dtype"] == "float32"
    assert [r["kind"] for r in train] == ["train"] * 4
    assert [r["run"] for r in train] == ["sft_packed", "sft_padded", "align_frozen", "lora_sft"]
    for r in train:
        assert all(k in r for k in CONTRACT)
        assert r["real_tokens_per_s"] > 0 and 0 < r["utilisation"] < 1 and 0 <= r["padding_fraction"] < 1
        assert r["peak_mem_gib"] is None and r["plan_gib"] > 0  # no CUDA allocator on a CPU
        assert r["activation_checkpointing"] is False  # auto is off on a CPU
    by = {r["run"]: r for r in train}
    assert by["sft_padded"]["padding_fraction"] > by["sft_packed"]["padding_fraction"]
    assert by["lora_sft"]["lora_rank"] == 16 and "llm" not in by["align_frozen"]["trainable"]


def test_work_counted_is_the_work_done():
    """6·N·D trained, 4·N·D through a frozen LLM below trainable projectors, 2·N·D frozen encoders."""
    full, align, lora = (gpu_train.stage_for(r, 2, 4, 2) for r in ("sft_packed", "align_frozen", "lora_sft"))
    assert set(passes_for(full).values()) == {6}
    assert passes_for(align) == passes_for(lora) == {"vision_tower": 2, "vision_projector": 6, "audio_encoder": 2,
                                                     "audio_projector": 6, "llm": 4}
    frozen_llm = passes_for(full.model_copy(update={"trainable": ["vision_tower"]}))
    assert frozen_llm["vision_projector"] == frozen_llm["llm"] == 4 and frozen_llm["audio_projector"] == 2


def test_flops_of_a_text_sample_scale_with_the_passes(tiny_cfg, tokenizer):
    from model.nn.omni import OmniModel
    from model.text.processor import ChatInput, OmniProcessor

    processor = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids)
    flops = FlopModel.of(model, processor)
    text = processor.encode(ChatInput(messages=[{"role": "user", "content": "describe the shape"},
                                                {"role": "assistant", "content": "A B C D"}]))
    n = len(text.input_ids)
    attention = 4 * flops.llm_attn * n * (n + 1) / 2  # forward; x3 with backward
    assert flops.sample(text) == 6 * flops.llm * n + 3 * attention
    assert flops.sample(text, {"llm": 4}) == 4 * flops.llm * n + 3 * attention
    assert flops.sample(text, {"llm": 2}) == 2 * flops.llm * n + attention


def test_sizes_are_the_shapes_measured():
    assert abs(sum(parameter_counts(gpu_train.size_config("1.5b")).values()) - 2.91e9) / 2.91e9 < 0.01
    assert gpu_train.size_config("7b").llm.hidden_size == 3584
    assert gpu_train.datasheet_tflops("NVIDIA H200") == gpu_train.datasheet_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_train.datasheet_tflops("NVIDIA H100 PCIe") == 756.0 and gpu_train.datasheet_tflops(None) is None
