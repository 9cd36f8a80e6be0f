"""LoRA as a stage option: gradients reach only the adapters (plus the stage's other trainable
modules), merging them changes no output, and a LoRA stage leaves a plain checkpoint behind."""

import torch

from model.config import LoraConfig, StageConfig
from model.nn.omni import OmniModel
from model.nn.plan import adapter_parameters, parameter_counts, plan_stage
from model.text.processor import OmniProcessor
from model.training import lora
from model.training.optim import set_trainable
from model.training.recipe import train_stage
from tests.model.training.test_recipe import _omni_sample

ADAPTERS = LoraConfig(rank=4, alpha=8, dropout=0.0)


def _model(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    processor = OmniProcessor(tokenizer, tiny_cfg)
    return OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids), processor


def test_gradients_reach_only_the_adapters_and_the_other_trainable_modules(tiny_cfg, tokenizer):
    model, processor = _model(tiny_cfg, tokenizer)
    set_trainable(model, ["vision_projector", "llm"])
    lora.attach(model, ADAPTERS)
    model(**processor.collate([processor.encode(_omni_sample())])).loss.backward()
    llm = dict(model.llm.named_parameters())
    adapters = {n for n in llm if "lora_" in n}
    assert adapters and all(llm[n].grad is not None for n in adapters if "lora_B" in n)
    assert all(p.grad is None and not p.requires_grad for n, p in llm.items() if n not in adapters)
    assert all(p.grad is not None for p in model.vision_projector.parameters())
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert sum(llm[n].numel() for n in adapters) == adapter_parameters(
        OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids).llm, ADAPTERS)


def test_merged_logits_equal_unmerged_and_the_checkpoint_is_plain(tiny_cfg, tokenizer, tmp_path):
    model, processor = _model(tiny_cfg, tokenizer)
    plain_keys = set(model.state_dict())
    adapters = lora.attach(model, ADAPTERS)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter): make it do something
                p.normal_(0, 0.05)
    batch = processor.collate([processor.encode(_omni_sample())])
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
        lora.merge(model, adapters)
        merged = model(**batch).logits
    diff = (merged - unmerged).abs().max().item()
    print(f"LoRA merged vs unmerged logits: max diff {diff:.3g} (logits up to {unmerged.abs().max().item():.3g})")
    assert diff < 1e-4
    assert set(model.state_dict()) == plain_keys
    model.save_pretrained(tmp_path / "ckpt", tokenizer)
    again = OmniModel.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, merged)


def test_a_lora_stage_trains_the_adapters_and_merges_them(tiny_cfg, tokenizer):
    model, processor = _model(tiny_cfg, tokenizer)
    before = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
    samples = [processor.encode(_omni_sample(c)) for c in ("red", "blue")]
    stage = StageConfig(name="sft", trainable=["audio_projector", "llm"], lr=1e-2, data_tasks=["x"], steps=2,
                        micro_batch_size=2, zero_stage=0, lora=ADAPTERS)
    result = train_stage(model, processor, samples, stage, progress=False)
    after = dict(model.llm.named_parameters())
    assert set(after) == set(before)  # merged: no lora_ names left
    assert any(not torch.equal(after[n], before[n]) for n in before if "q_proj.weight" in n)
    assert result.trainable_params == adapter_parameters(model.llm, ADAPTERS) + sum(
        p.numel() for p in model.audio_projector.parameters())


def test_plan_counts_adapters_and_their_optimizer_state(tiny_cfg):
    counts = parameter_counts(tiny_cfg)
    full = StageConfig(name="sft", trainable=["llm"], lr=1e-5, data_tasks=["x"], steps=1)
    with_lora = full.model_copy(update={"lora": ADAPTERS})
    n = 12345
    a, b = plan_stage(tiny_cfg, full, 2, 1, counts=counts), plan_stage(tiny_cfg, with_lora, 2, 1, counts=counts,
                                                                       adapters=n)
    assert b.optimizer_gib * 2**30 == 12 * n and a.optimizer_gib * 2**30 == 12 * counts["llm"]
    assert b.weights_gib > a.weights_gib
