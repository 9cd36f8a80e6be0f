"""Composing an omni checkpoint from tiny Hugging Face parts made with the real classes: parity with
the originals (LLM logits, SigLIP vision tower, Whisper encoder on 30 s), embedding rows, what is
freshly initialised, config disagreements, bad checkpoints, the CLI, and export back to HF."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2ForCausalLM,
    SiglipImageProcessor,
    SiglipModel,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from model.config import ModelConfig
from model.nn.compose import compose
from model.nn.omni import OmniModel
from model.nn.sources import ArchitectureMismatch
from model.text.processor import OmniProcessor
from model.text.tokenizer import IM_END, SPECIAL_TOKENS, load_tokenizer
from pipelines.cli import main
from tests.conftest import REPO
from tests.hf_parts import make_llm, make_parts


def model_cfg(name: str = "hf", **init) -> ModelConfig:
    raw = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))
    raw["init"] = {k: str(v) for k, v in init.items()}
    return ModelConfig(**raw)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def composed(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("composed") / "ckpt"
    report = compose(model_cfg(**parts), out)
    return out, report, OmniModel.from_pretrained(out).eval()


def test_llm_logits_equal_the_original(parts, composed):
    _, _, model = composed
    original = Qwen2ForCausalLM.from_pretrained(parts["llm"]).eval()
    tok = AutoTokenizer.from_pretrained(parts["llm"])
    ids = torch.tensor([tok.encode("what color is the shape? red green blue")])
    with torch.no_grad():  # the columns of the LLM's own tokens (the rows of our added tokens are new)
        ours = model(input_ids=ids).logits[..., : len(tok)]
        theirs = original(input_ids=ids).logits[..., : len(tok)]
    diff = (ours - theirs).abs().max().item()
    print(f"LLM logits max |composed - original| = {diff:.3g}")
    assert diff == 0.0


def test_vision_tower_equals_siglip_on_its_image_processor_pixels(parts, composed, tiny_cfg):
    _, _, model = composed
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    pixels = SiglipImageProcessor(size={"height": 64, "width": 64})(image, return_tensors="pt")["pixel_values"]
    reference = SiglipModel.from_pretrained(parts["vision"]).eval().vision_model
    with torch.no_grad():
        ours = model.vision_tower(pixel_values=pixels).last_hidden_state
        theirs = reference(pixel_values=pixels).last_hidden_state
    diff = (ours - theirs).abs().max().item()
    ours_pixels = OmniProcessor(load_tokenizer(parts["llm"]), model.cfg).pixels(image)
    print(f"vision tower max |composed - SiglipModel.vision_model| = {diff:.3g}; "
          f"pixels max diff {(ours_pixels - pixels[0]).abs().max().item():.3g}")
    assert diff == 0.0
    torch.testing.assert_close(ours_pixels, pixels[0], atol=1e-6, rtol=0)


def test_audio_encoder_equals_whisper_encoder_on_30_seconds(parts, composed):
    _, _, model = composed
    wave = np.random.default_rng(1).normal(0, 0.1, 30 * 16000).astype(np.float32)
    mel = WhisperFeatureExtractor(feature_size=80)(wave, sampling_rate=16000, return_tensors="pt")["input_features"]
    reference = WhisperForConditionalGeneration.from_pretrained(parts["audio"]).eval().model.encoder
    with torch.no_grad():
        ours = model.audio_encoder(mel)
        theirs = reference(mel).last_hidden_state
    diff = (ours - theirs).abs().max().item()
    print(f"audio encoder (30 s, {mel.shape[-1]} frames) max |composed - WhisperEncoder| = {diff:.3g}")
    assert mel.shape[-1] == 3000 and diff < 1e-5


def test_only_projectors_and_added_rows_are_new(parts, composed):
    out, report, model = composed
    original = Qwen2ForCausalLM.from_pretrained(parts["llm"]).state_dict()
    source_tokens = len(AutoTokenizer.from_pretrained(parts["llm"]))
    ckpt_rows = original["model.embed_tokens.weight"].shape[0]
    tok = load_tokenizer(out / "tokenizer")
    assert len(tok) == source_tokens + 11 > ckpt_rows and model.vocab_size == len(tok)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        ours, theirs = model.llm.state_dict()[name], original[name]
        assert torch.equal(ours[:source_tokens], theirs[:source_tokens])  # original rows unchanged
        mean = theirs[:source_tokens].mean(0)  # added tokens: 3 of the checkpoint's padding rows, then 8 new rows
        torch.testing.assert_close(ours[source_tokens:], mean.expand(len(tok) - source_tokens, -1))
    # Every other loaded tensor is the checkpoint's, bit for bit.
    for name, t in original.items():
        if "embed_tokens" not in name and name != "lm_head.weight":
            assert torch.equal(model.llm.state_dict()[name], t), name
    assert report["llm"]["new_rows"] == 11 and report["vision"]["new_parameters"] == 0
    assert report["audio"]["new_parameters"] == 0 and report["projectors"]["new_parameters"] > 0
    assert report["vision"]["tensors_dropped"] > 0 and report["audio"]["tensors_dropped"] > 0  # text tower, decoder


def test_stop_set_has_im_end_and_the_checkpoints_eos(parts, composed):
    out, _, model = composed
    tok = load_tokenizer(out / "tokenizer")
    assert set(model.stop_token_ids) == {tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids("<|endoftext|>")}
    assert all(tok.convert_tokens_to_ids(t) < len(tok) for t in SPECIAL_TOKENS)


def test_a_config_value_the_checkpoint_contradicts_fails_before_weights_are_read(parts, tmp_path):
    llm = tmp_path / "llm"
    shutil.copytree(parts["llm"], llm)
    (llm / "model.safetensors").write_bytes(b"not read")  # reading it would fail differently
    cfg = model_cfg("tiny", llm=llm).model_copy(deep=True)
    cfg.llm.hidden_size, cfg.llm.num_attention_heads = 256, 4
    with pytest.raises(ArchitectureMismatch, match=r"model\.llm\.hidden_size: the config says 256, .* says 128"):
        compose(cfg, tmp_path / "out")


def test_tiny_yaml_agrees_with_matching_parts_and_a_tied_llm(parts, tmp_path):
    llm = tmp_path / "tied"
    original, tok = make_llm(llm, tie=True)
    report = compose(model_cfg("tiny", llm=llm, vision=parts["vision"]), tmp_path / "out")
    model = OmniModel.from_pretrained(tmp_path / "out").eval()
    assert report["audio"]["source"] is None and report["audio"]["new_parameters"] > 0
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight
    ids = torch.tensor([tok.encode("one two three")])
    with torch.no_grad():
        torch.testing.assert_close(model.llm(ids).logits[..., : len(tok)], original(ids).logits[..., : len(tok)])


def test_unexpected_tensors_fail_naming_them(parts, tmp_path):
    audio = tmp_path / "audio"
    shutil.copytree(parts["audio"], audio)
    state = load_file(audio / "model.safetensors")
    save_file({**state, "model.encoder.extra_adapter.weight": torch.zeros(2)}, audio / "model.safetensors")
    with pytest.raises(ValueError, match="extra_adapter"):
        compose(model_cfg(**{**parts, "audio": audio}), tmp_path / "out")


def test_cli_prints_counts_as_its_last_line_and_export_hf_round_trips(parts, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["model", "compose", "--llm", str(parts["llm"]), "--vision", str(parts["vision"]), "--audio",
                 str(parts["audio"]), "--out", str(out), "model=hf"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["llm"]["tensors_loaded"] > 0 and counts["vision"]["source"] == str(parts["vision"])
    assert main(["model", "export-hf", "--model-dir", str(out), "--out", str(tmp_path / "hf")]) == 0
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    omni = OmniModel.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode("<img_start>what color<img_end>")])
    with torch.no_grad():
        diff = (hf(ids).logits - omni.llm(ids).logits).abs().max().item()
    assert diff == 0.0 and len(tok) == exported["tokenizer_tokens"] and tok.convert_tokens_to_ids("<img_pad>") > 0
    assert set(hf.generation_config.eos_token_id) == set(omni.stop_token_ids)


def test_fresh_compose_without_sources_writes_the_configured_size(tmp_path, capsys):
    assert main(["model", "compose", "--out", str(tmp_path / "fresh"), "model=tiny"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(counts[p]["source"] is None and counts[p]["new_parameters"] > 0 for p in ("llm", "vision", "audio"))
    assert OmniModel.from_pretrained(tmp_path / "fresh").cfg.llm.hidden_size == 128


def test_sharded_omni_checkpoint_round_trips(composed, tmp_path):
    _, _, model = composed
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    again = OmniModel.from_pretrained(tmp_path / "sharded")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_rope_scaling_sliding_window_and_ties_come_from_config_json():
    from transformers import Qwen2Config

    from model.nn.hf import architecture, hf_configs

    theirs = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True, use_sliding_window=True,
                         sliding_window=256, max_window_layers=2, rope_theta=5e5,
                         rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048})
    values = architecture("llm", theirs)
    assert values["rope_theta"] == 5e5 and values["rope_scaling"]["rope_type"] == "yarn"
    assert values["sliding_window"] == 256 and values["tie_word_embeddings"] is True
    raw = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml"))
    cfg = ModelConfig(**{**raw, "llm": values})
    ours = hf_configs(cfg, 100)[2]
    assert ours.rope_parameters == theirs.rope_parameters and ours.layer_types == theirs.layer_types
    assert ours.sliding_window == 256 and ours.tie_word_embeddings


def test_plan_counts_the_composed_parts(parts, composed):
    from model.nn.plan import parameter_counts

    _, _, model = composed
    counts = parameter_counts(model_cfg(**parts))
    assert counts["llm"] == sum(p.numel() for p in model.llm.parameters())
    assert counts["vision_tower"] == sum(p.numel() for p in model.vision_tower.parameters())
