import pytest

from components.config import load_config
from model.nn.plan import parameter_counts, plan_stage

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


def _measured_activation_peak(cfg, seq_len: int, batch: int, checkpointing: bool, tmp_path) -> float:
    """Peak bytes of activations (torch's memory profiler: activations, temporaries and autograd's
    own buffers) over one forward + backward of the LLM in fp32 on the CPU."""
    import json
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category

    from model.nn.omni import OmniModel

    torch.manual_seed(0)
    vocab = cfg.tokenizer.vocab_size
    model = OmniModel(cfg, vocab, {"image": 0, "video": 1, "audio": 2}).train()
    model.requires_grad_(False)
    model.llm.requires_grad_(True)
    model.set_activation_checkpointing(checkpointing)
    ids = torch.randint(3, vocab, (batch, seq_len))
    inputs = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    model(**inputs).loss.backward()  # warm-up: lazy initialisation is not activation memory
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        model(**inputs).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prof.export_memory_timeline(str(tmp_path / "timeline.json"), device="cpu")
    _, sizes = json.loads((tmp_path / "timeline.json").read_text())
    columns = [_CATEGORY_TO_INDEX[c] + 1 for c in (Category.ACTIVATION, Category.TEMPORARY, Category.AUTOGRAD_DETAIL)]
    return max(sum(row[c] for c in columns) for row in sizes)


@pytest.mark.parametrize(("checkpointing", "chunk"), [(False, 0), (False, 256), (True, 0), (True, 256)])
def test_plan_activations_match_measured_peak_memory_within_20_percent(tmp_path, checkpointing, chunk):
    """The formulas (llm_layer_bytes, head_bytes, activation_bytes) against torch's memory profiler on
    the small config (fp32 on CPU: 4 bytes per element), 2 layers, 4 x 256 tokens."""
    import torch

    from model.nn.plan import activation_bytes

    torch.set_num_threads(1)
    cfg = load_config(["model=small", f"model.loss_chunk_tokens={chunk}"]).model
    cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"num_hidden_layers": 2})})
    planned = activation_bytes(cfg, 256, 4, checkpointing, dtype_bytes=4)
    measured = _measured_activation_peak(cfg, 256, 4, checkpointing, tmp_path)
    assert abs(planned - measured) / measured < 0.20, (planned / 2**20, measured / 2**20)


def test_chunked_loss_is_what_lets_the_paper_model_fit():
    """omni-7b, sft, 8 x 4096 tokens, ZeRO-2 on 8 x 80 GB: the plain loss does not fit, the chunked does."""
    paper = load_config(["model=omni-7b", "recipe=paper"])
    plain = load_config(["model=omni-7b", "recipe=paper", "model.loss_chunk_tokens=0"])
    chunked_plan = plan_stage(paper.model, paper.stages["sft"], 2, 8)
    plain_plan = plan_stage(plain.model, plain.stages["sft"], 2, 8)
    assert chunked_plan.loss == "chunked 1024" and plain_plan.loss == "plain"
    assert plain_plan.head_gib > 50 > chunked_plan.head_gib * 10  # ~56 GiB of logits vs ~3
    assert chunked_plan.total_gib < 0.9 * 80 < plain_plan.total_gib
