"""The chunked LM-head loss gives transformers' plain loss and gradients, and keeps no logits."""

from __future__ import annotations

import pytest
import torch

from model.nn.loss import chunked_causal_lm_loss
from model.nn.omni import OmniModel
from model.text.processor import ChatInput, OmniProcessor


def _batch(processor: OmniProcessor) -> dict:
    convs = [[{"role": "user", "content": f"what color is {c}"}, {"role": "assistant", "content": c * (i + 1)}]
             for i, c in enumerate(["red", "green blue", "yellow"])]
    return processor.collate([processor.encode(ChatInput(messages=m)) for m in convs])


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_loss_and_gradients_equal_the_plain_loss(tiny_cfg, tokenizer, chunk):
    processor = OmniProcessor(tokenizer, tiny_cfg)
    torch.manual_seed(0)
    plain = OmniModel(tiny_cfg.model_copy(update={"loss_chunk_tokens": 0}), len(tokenizer), processor.placeholder_ids)
    chunked = OmniModel(tiny_cfg.model_copy(update={"loss_chunk_tokens": chunk}), len(tokenizer),
                        processor.placeholder_ids)
    chunked.load_state_dict(plain.state_dict())
    batch = _batch(processor)
    out_plain, out_chunked = plain(**batch), chunked(**batch)
    assert out_chunked.logits is None
    torch.testing.assert_close(out_chunked.loss, out_plain.loss, atol=1e-6, rtol=1e-5)
    out_plain.loss.backward()
    out_chunked.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_no_target_gives_zero_with_a_graph():
    head = torch.nn.Linear(4, 10)
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    loss = chunked_causal_lm_loss(hidden, torch.full((1, 3), -100), head, 2)
    loss.backward()
    assert loss.item() == 0 and hidden.grad is not None


def test_the_default_chunks_only_large_vocabularies(tiny_cfg):
    assert tiny_cfg.loss_chunk(1024) == 0 and tiny_cfg.loss_chunk(152_064) == 1024
    assert tiny_cfg.model_copy(update={"loss_chunk_tokens": 7}).loss_chunk(1024) == 7


@pytest.mark.parametrize("chunk", [0, 3])
def test_per_sample_scores_equal_cross_entropy_over_the_full_logits(tiny_cfg, tokenizer, chunk):
    import torch.nn.functional as F

    processor = OmniProcessor(tokenizer, tiny_cfg)
    torch.manual_seed(0)
    model = OmniModel(tiny_cfg.model_copy(update={"loss_chunk_tokens": chunk}), len(tokenizer),
                      processor.placeholder_ids).eval()
    batch = _batch(processor)
    labels = batch["labels"]
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
        token = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
        expected = token.sum(1) / (labels[:, 1:] != -100).sum(1)
        torch.testing.assert_close(model.sample_losses(**batch), expected, atol=1e-5, rtol=1e-5)
