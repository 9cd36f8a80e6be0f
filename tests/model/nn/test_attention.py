"""torch's packed-row kernels (varlen, flex) against the block-diagonal-mask sdpa route they replace.

FlexAttention's forward runs on a CPU (eagerly), so it is compared here on every machine. torch's
varlen kernel and FlexAttention's backward are CUDA-only: those comparisons run where CUDA is
visible (the GPU check) and are skipped, with the reason, everywhere else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model import runtime
from model.data.packing import collate_packed
from model.nn.attention import FLEX_BLOCK, PACKED_KERNELS, pad_to_bucket
from model.nn.omni import OmniModel
from model.text.processor import IGNORE_INDEX, ChatInput, OmniProcessor

CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="torch's varlen_attn and FlexAttention's backward run on CUDA only (GPU check)")


def _chat(user: str, answer: str, **media) -> ChatInput:
    return ChatInput(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **media)


@pytest.fixture(scope="module")
def packed(tiny_cfg, tokenizer):
    """Two packed rows of mixed samples (image, audio, text), as the sdpa route collates them."""
    processor = OmniProcessor(tokenizer, tiny_cfg)
    rng = np.random.default_rng(0)
    samples = [processor.encode(c) for c in (
        _chat("<image>what color?", "red", images=[Image.new("RGB", (64, 64), (255, 0, 0))]),
        _chat("<audio>transcribe the audio", "one two three", audios=[rng.normal(0, 0.1, 16000).astype(np.float32)]),
        _chat("describe the shape", "A B C D"),
        _chat("what color is the shape", "green blue"),
    )]
    return processor, [[samples[0], samples[2]], [samples[1], samples[3]]]


def _models(tiny_cfg, processor, kernel: str, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    reference = OmniModel(tiny_cfg, len(processor.tok), processor.placeholder_ids)
    other = OmniModel(tiny_cfg.model_copy(update={"attn_implementation": kernel}), len(processor.tok),
                      processor.placeholder_ids)
    other.load_state_dict(reference.state_dict())
    return reference.to(device, dtype), other.to(device, dtype)


def _spans(bins):
    """(row, slice) of every sample in the padded rows, and its slice in the one unpadded row."""
    out, flat = [], 0
    for r, row in enumerate(bins):
        start = 0
        for s in row:
            n = len(s.input_ids)
            out.append(((r, slice(start, start + n)), slice(flat, flat + n)))
            start, flat = start + n, flat + n
    return out


def _to(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_equals_the_block_mask_route(tiny_cfg, packed, monkeypatch):
    processor, bins = packed
    reference, flex = _models(tiny_cfg, processor, "flex")
    assert flex.varlen and not reference.varlen
    masked = collate_packed(processor, bins)
    row = collate_packed(processor, bins, explicit_mask=False, kernel="flex")
    width = row["input_ids"].shape[1]
    assert width % FLEX_BLOCK == 0 and width > sum(len(s.input_ids) for b in bins for s in b)  # bucketed
    import transformers.masking_utils as masking

    def no_mask_wanted(*_):
        raise AssertionError("the flex route built a mask from position ids")

    monkeypatch.setattr(masking, "find_packed_sequence_indices", no_mask_wanted)
    with torch.no_grad():
        want = reference.eval()(**masked).logits
        got = flex.eval()(**row).logits
    for (r, span), flat in _spans(bins):
        torch.testing.assert_close(got[0, flat], want[r, span], atol=2e-5, rtol=1e-4)


def test_kernels_without_bounds_fall_back_to_sdpa_with_the_mask(tiny_cfg, packed):
    """Generation, the padded route and the SFT filter pass no cu_seq_lens: same logits as sdpa."""
    processor, bins = packed
    reference, flex = _models(tiny_cfg, processor, "flex")
    batch = processor.collate([s for b in bins for s in b])  # padded, with a 2D mask
    with torch.no_grad():
        torch.testing.assert_close(flex.eval()(**batch).logits, reference.eval()(**batch).logits)
    pad = processor.tok.pad_token_id
    ids = batch["input_ids"][:, :12].clone()
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = pad, 0  # left padding, with the KV cache
    greedy = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": pad}
    assert torch.equal(flex.llm.generate(ids, **greedy), reference.llm.generate(ids, **greedy))


def test_flex_row_padding_is_a_sample_of_its_own(packed):
    processor, bins = packed
    row = collate_packed(processor, bins, explicit_mask=False, kernel="flex")
    real = sum(len(s.input_ids) for b in bins for s in b)
    width, bounds = row["input_ids"].shape[1], row["cu_seq_lens_q"].tolist()
    assert bounds[-2] == real and bounds[-1] == width and len(bounds) == 2 + sum(len(b) for b in bins)
    assert (row["labels"][0, real:] == IGNORE_INDEX).all()
    assert row["position_ids"][0, real:].tolist() == list(range(width - real))
    assert row["max_length_q"] == max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    unpadded = collate_packed(processor, bins, explicit_mask=False, kernel="varlen")
    assert unpadded["input_ids"].shape[1] == real and unpadded["cu_seq_lens_q"].tolist()[-1] == real


def test_flex_buckets_bound_shapes_and_padding():
    lengths = range(1, 8193)
    buckets = {pad_to_bucket(n, "flex") for n in lengths}
    assert all(b % FLEX_BLOCK == 0 for b in buckets)
    assert all(0 <= pad_to_bucket(n, "flex") - n < max(FLEX_BLOCK, n / 8) for n in lengths)
    assert len({pad_to_bucket(n, "flex") for n in range(4097, 8193)}) == 8  # 8 shapes per doubling
    assert all(pad_to_bucket(n, k) == n for n in (1, 777, 4096) for k in ("varlen", "flash_attention_2", "sdpa"))


def test_auto_takes_torch_varlen_on_a_gpu_without_flash_attn(monkeypatch):
    monkeypatch.setattr(runtime, "flash_attention_available", lambda: False)
    monkeypatch.setattr(runtime, "varlen_available", lambda: True)
    assert runtime.attention_kernel("auto") == "varlen"
    monkeypatch.setattr(runtime, "flash_attention_available", lambda: True)
    assert runtime.attention_kernel("auto") == "flash_attention_2"
    assert runtime.attention_kernel("flex") == "flex" and "varlen" in PACKED_KERNELS


def test_varlen_on_a_cpu_is_refused_clearly(tiny_cfg, packed):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU test below runs the kernel")
    processor, bins = packed
    _, varlen = _models(tiny_cfg, processor, "varlen")
    with torch.no_grad(), pytest.raises(ValueError, match="varlen runs on CUDA only"):
        varlen.eval()(**collate_packed(processor, bins, explicit_mask=False, kernel="varlen"))


def _reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None,
                      enable_gqa=False, is_causal=None):
    """varlen_attn's contract computed document by document with sdpa: (tokens, heads, dim) in and out."""
    causal = tuple(window_size) == (-1, 0) if window_size is not None else bool(is_causal)
    assert key.shape[1] == query.shape[1] or enable_gqa, "kv heads differ without enable_gqa"
    bounds = cu_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    out = [torch.nn.functional.scaled_dot_product_attention(
        *(t[a:b].transpose(0, 1)[None] for t in (query, key, value)), is_causal=causal, scale=scale,
        enable_gqa=enable_gqa)[0].transpose(0, 1) for a, b in zip(bounds, bounds[1:], strict=False)]
    return torch.cat(out)


def _torch_2_10_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, is_causal=False):
    """The oldest signature: no window_size, scale or enable_gqa."""
    return _reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, is_causal=is_causal)


@pytest.mark.parametrize("signature", [_reference_varlen, _torch_2_10_varlen], ids=["torch-2.13", "torch-2.10"])
def test_varlen_arguments_match_the_block_mask_route(tiny_cfg, packed, monkeypatch, signature):
    """The varlen wrapper's layout, GQA, causality and scale, on a CPU: torch's kernel (CUDA-only)
    replaced by its contract computed per document, for the newest and the oldest signature."""
    import inspect

    import torch.nn.attention.varlen as torch_varlen

    from model.nn import attention

    processor, bins = packed
    monkeypatch.setattr(attention, "_require_cuda", lambda query: None)
    monkeypatch.setattr(torch_varlen, "varlen_attn", signature)
    monkeypatch.setattr(attention, "_varlen_parameters", lambda: frozenset(inspect.signature(signature).parameters))
    reference, varlen = _models(tiny_cfg, processor, "varlen")
    with torch.no_grad():
        want = reference.eval()(**collate_packed(processor, bins)).logits
        got = varlen.eval()(**collate_packed(processor, bins, explicit_mask=False, kernel="varlen")).logits
    for (r, span), flat in _spans(bins):
        torch.testing.assert_close(got[0, flat], want[r, span], atol=2e-5, rtol=1e-4)
    mel, frames, padded = _audio_windows(tiny_cfg)  # Whisper: not causal, its own scale
    unpadded = type(padded)(padded.encoder.config.__class__(**padded.encoder.config.to_dict())).eval()
    unpadded.load_state_dict(padded.state_dict())
    unpadded.encoder.config._attn_implementation = "varlen"
    with torch.no_grad():
        want, got = padded(mel, frames), unpadded(mel, frames)
    for w, n in enumerate(((frames + 1) // 2).tolist()):
        torch.testing.assert_close(got[w, :n], want[w, :n], atol=1e-5, rtol=1e-4)


@CUDA
@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_gpu_kernel_forward_and_backward_equal_the_block_mask_route(tiny_cfg, packed, kernel):
    """bf16 on CUDA: logits and every gradient of the LLM match the sdpa block-mask route."""
    processor, bins = packed
    reference, other = _models(tiny_cfg, processor, kernel, "cuda", torch.bfloat16)
    masked = _to(collate_packed(processor, bins), "cuda")
    row = _to(collate_packed(processor, bins, explicit_mask=False, kernel=kernel), "cuda")
    grads, logits = [], []
    for model, batch, real in ((reference, masked, [p for p, _ in _spans(bins)]),
                               (other, row, [(0, f) for _, f in _spans(bins)])):
        model.train()
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        logits.append(out)
        sum(out[r, span].float().square().mean() for r, span in real).backward()  # real positions only
        grads.append({n: p.grad for n, p in model.llm.named_parameters() if p.grad is not None})
    for (r, span), flat in _spans(bins):
        torch.testing.assert_close(logits[1][0, flat].float(), logits[0][r, span].float(), atol=3e-2, rtol=3e-2)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        cos = torch.nn.functional.cosine_similarity(grad.flatten().float(), grads[1][name].flatten().float(), dim=0)
        assert cos > 0.99, f"{kernel}: gradient of {name} differs (cosine {cos:.4f})"


def _audio_windows(tiny_cfg):
    """Three windows of different valid lengths, padded to the longest, and an encoder per kernel."""
    from model.nn.audio import AudioEncoder
    from model.nn.hf import hf_configs

    torch.manual_seed(0)
    mel = torch.randn(3, tiny_cfg.audio.num_mel_bins, 200)
    frames = torch.tensor([200, 130, 57])
    mel[1, :, 130:] = 0
    mel[2, :, 57:] = 0
    config = hf_configs(tiny_cfg, 64)[1]
    padded = AudioEncoder(config).eval()
    assert padded.encoder.config._attn_implementation == "sdpa"  # the LLM runs sdpa on a CPU
    return mel, frames, padded


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_audio_windows_unpadded_equal_the_masked_windows(tiny_cfg):
    """Whisper's windows laid end to end through a packed-row kernel (flex: it runs on a CPU; the
    trainer uses varlen there on a GPU) give each window's valid positions what the mask gave."""
    mel, frames, padded = _audio_windows(tiny_cfg)
    unpadded = type(padded)(padded.encoder.config.__class__(**padded.encoder.config.to_dict())).eval()
    unpadded.load_state_dict(padded.state_dict())
    unpadded.encoder.config._attn_implementation = "flex"
    with torch.no_grad():
        want, got = padded(mel, frames), unpadded(mel, frames)
    for w, n in enumerate(((frames + 1) // 2).tolist()):
        torch.testing.assert_close(got[w, :n], want[w, :n], atol=1e-5, rtol=1e-4)
    assert got.shape == want.shape


@CUDA
def test_gpu_audio_windows_through_varlen_equal_the_masked_windows(tiny_cfg):
    mel, frames, padded = _audio_windows(tiny_cfg)
    padded = padded.to("cuda", torch.bfloat16)
    unpadded = type(padded)(padded.encoder.config.__class__(**padded.encoder.config.to_dict()))
    unpadded.load_state_dict(padded.state_dict())
    unpadded = unpadded.to("cuda", torch.bfloat16).train()
    unpadded.encoder.config._attn_implementation = "varlen"
    mel, frames = mel.cuda(), frames.cuda()
    want, got = padded.train()(mel, frames), unpadded(mel, frames)
    for w, n in enumerate(((frames + 1) // 2).tolist()):
        torch.testing.assert_close(got[w, :n].float(), want[w, :n].float(), atol=3e-2, rtol=3e-2)
    sum(o[w, :n].float().square().mean() for o in (got,) for w, n in enumerate(((frames + 1) // 2).tolist())).backward()
    assert all(p.grad is not None for p in unpadded.encoder.layers.parameters())
