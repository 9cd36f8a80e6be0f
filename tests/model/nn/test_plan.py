import pytest

from model.nn.plan import parameter_counts, plan_stage
from pipelines.config import load_config

PAPER_TOTAL = 8.76e9  # LLM 7,615.6M + SigLIP 428.2M + Whisper encoder 637.0M + projectors
SIGLIP_HEAD = 15_238_352  # so400m's attention-pooling head, which we drop: every patch goes to the projector


@pytest.fixture(scope="module")
def paper():
    return load_config(["model=omni-7b", "recipe=paper"])


def test_paper_size_parameter_count_within_one_percent(paper):
    counts = parameter_counts(paper.model)
    assert abs(sum(counts.values()) - PAPER_TOTAL) / PAPER_TOTAL < 0.01
    assert abs(counts["llm"] - 7615.6e6) / 7615.6e6 < 0.001
    assert abs(counts["vision_tower"] + SIGLIP_HEAD - 428.2e6) / 428.2e6 < 0.001
    assert abs(counts["audio_encoder"] - 637.0e6) / 637.0e6 < 0.001


def test_zero3_partitions_weights_and_frozen_modules_have_no_optimizer_state(paper):
    counts = parameter_counts(paper.model)
    sft, image_1 = paper.stages["sft"], paper.stages["image_1"]
    z2 = plan_stage(paper.model, sft, 2, 8, micro_batch=1, counts=counts)
    z3 = plan_stage(paper.model, sft, 3, 8, micro_batch=1, counts=counts)
    assert z3.weights_gib == pytest.approx(z2.weights_gib / 8)
    assert z3.total_gib < z2.total_gib < 80
    frozen_llm = plan_stage(paper.model, image_1, 2, 8, micro_batch=1, counts=counts)
    assert frozen_llm.optimizer_gib < 0.01 * z2.optimizer_gib


def test_small_config_is_a_cpu_benchmark_size():
    assert 30e6 < sum(parameter_counts(load_config(["model=small"]).model).values()) < 100e6


def test_plan_command_prints_both_zero_stages(capsys):
    from pipelines.cli import main

    assert main(["model", "plan", "model=omni-7b", "recipe=paper", "stages.sft.micro_batch_size=3", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "8.7" in out.splitlines()[0]
    sft = [line.split() for line in out.splitlines() if line.strip().startswith("sft ")]
    # One row per ZeRO stage, at the stage's configured micro-batch, and the ZeRO-3 row needs less.
    assert [(row[1], row[2]) for row in sft] == [("2", "3"), ("3", "3")]
    assert float(sft[1][-2]) < float(sft[0][-2])
