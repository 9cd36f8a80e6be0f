"""AnyRes tiling, the odd-grid merge (27x27 -> 182) and the image/video token layouts."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from model.config import ModelConfig
from model.media.anyres import select_grid, tile_image
from model.nn.omni import OmniModel
from model.nn.projectors import merge_2x2
from model.text.processor import ChatInput, OmniProcessor
from model.text.tokenizer import IMG_ROW_SEP, IMG_TILE_SEP

REPO = Path(__file__).resolve().parents[3]

GRIDS = [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1), (1, 3)]


@pytest.mark.parametrize(("size", "grid"), [
    ((256, 128), (2, 1)),   # wide -> two tiles side by side
    ((128, 256), (1, 2)),   # tall -> stacked
    ((256, 256), (2, 2)),   # big square -> 2x2
    ((400, 120), (3, 1)),   # panorama
    ((20, 20), (1, 1)),     # tiny: one tile, not blown up across four
    ((64, 64), (1, 1)),     # exactly one tile
    ((100, 60), (2, 1)),    # a bit over one tile wide: the grid that keeps the most pixels
])
def test_grid_choice(size, grid):
    assert select_grid(*size, tile=64, grids=GRIDS) == grid


def test_tiles_are_row_major_after_the_thumbnail():
    image = Image.new("RGB", (128, 64), "red")
    image.paste(Image.new("RGB", (64, 64), "blue"), (64, 0))  # right half blue
    grid, tiles = tile_image(image, 64, GRIDS)
    assert grid == (2, 1) and len(tiles) == 3 and all(t.size == (64, 64) for t in tiles)
    assert tiles[1].getpixel((32, 32)) == (255, 0, 0) and tiles[2].getpixel((32, 32)) == (0, 0, 255)


def test_odd_grid_gives_182_tokens_and_uses_every_patch():
    conv = nn.Conv2d(8, 8, kernel_size=2, stride=2)
    patches = torch.randn(2, 27 * 27, 8, requires_grad=True)
    out = merge_2x2(patches, conv)
    assert out.shape == (2, 182, 8)
    out.sum().backward()
    assert (patches.grad.abs().sum(-1) > 0).all(), "a patch does not reach any token"


def test_even_grid_is_a_plain_2x2_conv():
    conv = nn.Conv2d(4, 6, kernel_size=2, stride=2)
    patches = torch.randn(1, 16 * 16, 4)
    grid = patches.transpose(1, 2).reshape(1, 4, 16, 16)
    assert torch.allclose(merge_2x2(patches, conv), conv(grid).flatten(2).transpose(1, 2))


def test_paper_size_tile_is_182_tokens():
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "omni-7b.yaml")))
    assert cfg.vision.grid == 27 and cfg.vision.tokens_per_tile == 182


@pytest.fixture()
def parts(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    processor = OmniProcessor(tokenizer, tiny_cfg)
    return OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids).eval(), processor


def _ask(images=(), videos=(), times=None):
    tags = "<image>" * len(images) + "<video>" * len(videos)
    return ChatInput(messages=[{"role": "user", "content": tags + "what?"}, {"role": "assistant", "content": "red"}],
                     images=list(images), videos=list(videos), video_times=times or [])


def test_tiled_image_layout_matches_the_encoder(parts, tokenizer):
    model, processor = parts
    enc = processor.encode(_ask([Image.new("RGB", (128, 64), "red")]))
    ids, tile = enc.input_ids, processor.tile_tokens
    assert len(enc.pixel_values) == 3  # thumbnail + 2 tiles
    assert ids.count(processor.placeholder_ids["image"]) == 3 * tile
    assert ids.count(tokenizer.convert_tokens_to_ids(IMG_ROW_SEP)) == 1
    assert ids.count(tokenizer.convert_tokens_to_ids(IMG_TILE_SEP)) == 1
    with torch.no_grad():
        out = model(**processor.collate([enc]))
    assert torch.isfinite(out.loss)


def test_wide_and_tall_images_have_different_layouts(parts):
    _, processor = parts
    wide = processor.encode(_ask([Image.new("RGB", (128, 64))])).input_ids
    tall = processor.encode(_ask([Image.new("RGB", (64, 128))])).input_ids
    assert len(wide) == len(tall) and wide != tall


def test_video_frames_carry_their_timestamps(parts, tokenizer):
    _, processor = parts
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    enc = processor.encode(_ask(videos=[frames], times=[[0.0, 1.0, 2.0]]))
    text = tokenizer.decode([i for i in enc.input_ids if i != processor.placeholder_ids["video"]])
    assert "0s" in text and "1s" in text and "2s" in text
    assert enc.input_ids.count(processor.placeholder_ids["video"]) == 3 * processor.frame_tokens
    with pytest.raises(ValueError, match="3 frames but 2 frame times"):
        processor.encode(_ask(videos=[frames], times=[[0.0, 1.0]]))
