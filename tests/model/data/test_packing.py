import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.config import StageConfig
from model.data.packing import collate_packed, pack
from model.nn.omni import OmniModel
from model.text.processor import IGNORE_INDEX, ChatInput, Encoded, OmniProcessor
from model.training.recipe import train_stage

COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def _chat(user: str, answer: str, **media) -> ChatInput:
    return ChatInput(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **media)


def _mixed(processor: OmniProcessor) -> list[Encoded]:
    rng = np.random.default_rng(0)
    return [processor.encode(s) for s in (
        _chat("<image>what color?", "red", images=[Image.new("RGB", (64, 64), COLORS["red"])]),
        _chat("<audio>transcribe the audio", "one two three", audios=[rng.normal(0, 0.1, 16000).astype(np.float32)]),
        _chat("describe the shape", "A B C D"),
        _chat("<image><audio>what color?", "blue", images=[Image.new("RGB", (64, 64), COLORS["blue"])],
              audios=[rng.normal(0, 0.2, 24000).astype(np.float32)]),
        _chat("<video>what color?", "green", videos=[[Image.new("RGB", (64, 64), COLORS["green"])] * 2]),
    )]


@pytest.fixture(scope="module")
def setup(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    processor = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids).eval()
    return model, processor, _mixed(processor)


def _spans(row: list[Encoded]) -> list[slice]:
    out, start = [], 0
    for s in row:
        out.append(slice(start, start + len(s.input_ids)))
        start += len(s.input_ids)
    return out


@pytest.mark.parametrize("explicit_mask", [True, False], ids=["4d-mask", "position-ids-only"])
def test_packed_logits_equal_alone(setup, explicit_mask):
    model, processor, samples = setup
    # Two rows, media of every kind, two images and two audio clips in different rows and places.
    bins = [[samples[0], samples[1], samples[2]], [samples[4], samples[3]]]
    batch = collate_packed(processor, bins, explicit_mask=explicit_mask)
    if not explicit_mask:  # varlen layout: every bin in one unpadded row, boundaries in position_ids only
        assert "attention_mask" not in batch
        assert batch["input_ids"].shape == (1, sum(len(s.input_ids) for row in bins for s in row))
        bins = [[s for row in bins for s in row]]
    with torch.no_grad():
        packed = model(**batch).logits
        worst = 0.0
        for r, row in enumerate(bins):
            for s, span in zip(row, _spans(row), strict=True):
                alone = model(**processor.collate([s])).logits[0]
                worst = max(worst, (packed[r, span] - alone).abs().max().item())
    print(f"max |packed - alone| logits: {worst:.2e}")
    assert worst < 1e-5


def test_without_isolation_later_samples_change(setup):
    """The check above has teeth: a plain causal mask over the packed row does change the logits."""
    model, processor, samples = setup
    row = [samples[2], samples[0]]
    batch = collate_packed(processor, [row])
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        leaky = model(**batch).logits[0, _spans(row)[1]]
        alone = model(**processor.collate([samples[0]])).logits[0]
    assert (leaky - alone).abs().max() > 1e-3


def test_labels_never_cross_sample_boundaries(setup):
    model, processor, samples = setup
    row = [samples[1], samples[2], samples[0]]
    batch = collate_packed(processor, [row, [samples[3]]])
    labels = batch["labels"]
    segment = torch.full(labels.shape, -1)
    for k, span in enumerate(_spans(row)):
        segment[0, span] = k
        assert labels[0, span.start] == IGNORE_INDEX
        assert torch.equal(labels[0, span.start + 1 : span.stop], torch.tensor(row[k].labels[1:]))
    # After HF's shift, position t is trained on labels[t + 1]: that target must be in t's own sample.
    targets = labels[0, 1:] != IGNORE_INDEX
    assert torch.equal(segment[0, :-1][targets], segment[0, 1:][targets])
    assert (labels[1, len(samples[3].input_ids):] == IGNORE_INDEX).all()  # padding
    # So the packed loss is the token-weighted mean of the losses alone.
    with torch.no_grad():
        packed_loss = model(**batch).loss
        total, count = 0.0, 0
        for s in [*row, samples[3]]:
            b = processor.collate([s])
            logits = model(**b).logits[0, :-1]
            target = b["labels"][0, 1:]
            total += F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((target != IGNORE_INDEX).sum())
    assert packed_loss.item() == pytest.approx(total / count, abs=1e-5)


def test_position_ids_restart_and_mask_is_block_causal(setup):
    _, processor, samples = setup
    row = [samples[2], samples[0], samples[1]]
    batch = collate_packed(processor, [row, [samples[2]]])
    width = batch["input_ids"].shape[1]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, width, width) and mask.dtype == torch.bool
    for span in _spans(row):
        n = span.stop - span.start
        assert torch.equal(batch["position_ids"][0, span], torch.arange(n))
        block = mask[0, 0, span, span]
        assert torch.equal(block, torch.ones(n, n, dtype=torch.bool).tril())
        assert mask[0, 0, span].sum() == block.sum()  # nothing outside its own block
    n = len(samples[2].input_ids)
    assert torch.equal(batch["position_ids"][1, :n], torch.arange(n))
    assert not mask[1, 0, n:, :n].any()  # padding sees no sample


def test_pack_is_deterministic_first_fit_decreasing_and_bounded(setup):
    _, _, samples = setup
    lengths = [len(s.input_ids) for s in samples]
    for limit in (max(lengths), 200, 384):
        bins = pack(samples, limit)
        assert pack(samples, limit) == bins
        assert all(sum(len(s.input_ids) for s in b) <= limit for b in bins)
        assert sorted(id(s) for b in bins for s in b) == sorted(id(s) for s in samples)
    fake = [Encoded([0] * n, [0] * n) for n in (3, 7, 5, 2, 4, 6)]
    assert [[len(s.input_ids) for s in b] for b in pack(fake, 10)] == [[7, 3], [6, 4], [5, 2]]
    with pytest.raises(ValueError, match="11 tokens"):
        pack([*fake, Encoded([0] * 11, [0] * 11)], 10)


def test_deepspeed_stage_with_packing_learns(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    processor = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids)
    samples = [processor.encode(_chat("<image>what color?", c, images=[Image.new("RGB", (64, 64), rgb)]))
               for c, rgb in COLORS.items()] * 4
    stage = StageConfig(name="t", trainable=["vision_projector", "llm"], lr=3e-3, data_tasks=["x"], steps=20,
                        micro_batch_size=2, zero_stage=1, warmup_steps=2, packing=True)
    result = train_stage(model, processor, samples, stage, progress=False)
    assert len(result.losses) == 20
    assert result.losses[-1] < 0.2 * result.losses[0]
    assert result.tokens == 20 * 2 * 4 * len(samples[0].input_ids)  # 4 samples fill each 384-token row
