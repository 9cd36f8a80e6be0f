import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.nn.omni import OmniModel
from model.text.processor import ChatInput, Encoded, OmniProcessor


@pytest.fixture()
def parts(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    processor = OmniProcessor(tokenizer, tiny_cfg)
    return OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids).eval(), processor


def _sample(audio_seconds=1.0, frames=4):
    return ChatInput(
        messages=[
            {"role": "user", "content": "<image><video><audio>what color?"},
            {"role": "assistant", "content": "red"},
        ],
        images=[Image.new("RGB", (50, 40), "red")],
        videos=[[Image.new("RGB", (64, 64), "blue")] * frames],
        audios=[np.random.default_rng(0).normal(0, 0.1, int(16000 * audio_seconds)).astype(np.float32)],
    )


def test_forward_splices_every_modality_and_loss_is_finite(parts):
    model, processor = parts
    batch = processor.collate([processor.encode(_sample()), processor.encode(_sample(2.0, 2))])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_placeholder_count_matches_encoder_output(parts, tiny_cfg):
    model, processor = parts
    enc = processor.encode(_sample())
    pad = processor.placeholder_ids
    assert (
        enc.input_ids.count(pad["image"])
        == processor.tile_tokens
        == model.encode("image", torch.stack(enc.pixel_values)).shape[1]
    )
    assert enc.input_ids.count(pad["video"]) == 4 * processor.frame_tokens
    # 1 s of audio = 100 mel frames -> 50 encoder frames -> 50 / stride tokens
    assert enc.input_ids.count(pad["audio"]) == 100 // 2 // tiny_cfg.audio.projector_stride


def test_mismatched_placeholders_fail_clearly(parts):
    model, processor = parts
    batch = processor.collate([processor.encode(_sample())])
    batch.pop("pixel_values")
    with pytest.raises(ValueError, match="image placeholder"):
        model(**batch)


def test_audio_in_a_padded_batch_equals_audio_alone(parts):
    model, processor = parts
    windows = [
        processor.audio_windows(np.random.default_rng(i).normal(0, 0.1, n).astype(np.float32))[0]
        for i, n in enumerate((32000, 16000, 9000))
    ]
    batch = processor.collate([Encoded([0], [0], audio_mel=[w]) for w in windows])
    with torch.no_grad():
        together = model.encode("audio", batch["audio_mel"], batch["audio_frames"])
        for w, t in zip(windows, together, strict=True):
            alone = model.encode("audio", w[None], torch.tensor([w.shape[1]]))[0]
            torch.testing.assert_close(t, alone, atol=1e-5, rtol=1e-5)


def test_long_audio_is_windowed(parts):
    _, processor = parts
    windows = processor.audio_windows(np.zeros(16000 * 70, dtype=np.float32))
    assert [w.shape[1] for w in windows] == [3000, 3000, 1000]


def test_video_merge_pads_odd_grids_to_a_square():
    from torch import nn

    from model.nn.projectors import merge_2x2_padded

    conv = nn.Conv2d(8, 8, 2, 2)
    assert merge_2x2_padded(torch.randn(2, 27 * 27, 8), conv).shape == (2, 14 * 14, 8)
    assert merge_2x2_padded(torch.randn(2, 8 * 8, 8), conv).shape == (2, 16, 8)


def test_save_and_reload_roundtrip(parts, tmp_path, tokenizer):
    model, processor = parts
    model.save_pretrained(tmp_path, tokenizer)
    again = OmniModel.from_pretrained(tmp_path).eval()
    batch = processor.collate([processor.encode(_sample())])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, again(**batch).logits)


def test_attention_kernel_auto_is_sdpa_without_a_gpu_and_choices_are_kept(tiny_cfg, tokenizer):
    from model.runtime import attention_kernel

    assert attention_kernel("sdpa") == "sdpa" and attention_kernel("flash_attention_2") == "flash_attention_2"
    if not torch.cuda.is_available():
        assert attention_kernel("auto") == "sdpa"
    processor = OmniProcessor(tokenizer, tiny_cfg)
    eager = OmniModel(
        tiny_cfg.model_copy(update={"attn_implementation": "eager"}), len(tokenizer), processor.placeholder_ids
    )
    assert eager.llm.config._attn_implementation == "eager" and not eager.varlen
    assert eager.vision_tower.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("n", [2, 4, 8])
def test_conv_gmlp_is_gated_convs_down_projection_plus_a_linear_shortcut_then_layernorm(n):
    from model.nn.projectors import ConvGMLPProjector

    torch.manual_seed(n)
    proj = ConvGMLPProjector(audio_dim=6, llm_dim=10, stride=n).eval()
    frames = torch.randn(2, 5 * n + 1, 6)  # one trailing frame short of a window: dropped
    with torch.no_grad():
        out = proj(frames)
        assert out.shape == (2, 5, 10)
        assert proj.gate.kernel_size == proj.gate.stride == (n,) and proj.gate.out_channels == 6 * n
        # The same computation written out by hand, window by window.
        windows = frames[:, : 5 * n].reshape(2, 5, n, 6)  # (b, token, frame in window, channel)
        stacked = windows.reshape(2, 5, n * 6)

        def conv(c):  # kernel = stride = n: each output token sees exactly its own n frames
            w = c.weight.permute(0, 2, 1).reshape(c.out_channels, n * 6)  # (out, frame-major in)
            return stacked @ w.T + c.bias

        expected = proj.norm(proj.down(F.silu(conv(proj.gate)) * conv(proj.value)) + proj.shortcut(stacked))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bf16_weights_take_fp32_media_features(parts):
    """DeepSpeed's bf16 mode casts the weights, not the batch: every encoder must cast its input."""
    model, processor = parts
    batch = processor.collate([processor.encode(_sample())])
    half = OmniModel(model.cfg, model.vocab_size, model.media_token_ids).to(torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.isfinite(half(**batch).loss.float())
