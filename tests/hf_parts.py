"""Tiny "pretrained" Hugging Face parts for tests, made with the real classes and `save_pretrained`
(no model hub): a Qwen2ForCausalLM with a Qwen2 tokenizer trained here and given a Qwen2.5-style
chat template (default system prompt), a two-tower SiglipModel (sharded) and a
WhisperForConditionalGeneration. Their shapes match conf/model/tiny.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    SiglipConfig,
    SiglipModel,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

# Qwen2.5's template, shortened: a default system prompt when the conversation has none.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
WORDS = ("what color is the shape red green blue yellow purple describe transcribe the audio one two three four "
         "five A B C D which way does it move left right up down system user assistant helpful you are a")
LLM = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 2, "max_position_embeddings": 1024, "rope_theta": 10000.0}
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 64, "patch_size": 4}
AUDIO = {"num_mel_bins": 80, "d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
         "max_source_positions": 1500}


def qwen2_tokenizer(template: str = QWEN_TEMPLATE) -> Qwen2Tokenizer:
    """A byte-level BPE trained on WORDS as a Qwen2 tokenizer: <|endoftext|>, then ChatML markers after the BPE ids."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([WORDS] * 20 + ["0123456789 abcdefghijklmnopqrstuvwxyz"], trainer=trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token=None)
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def make_llm(folder: Path, tie: bool = False, seed: int = 0, **over) -> tuple[Qwen2ForCausalLM, Qwen2Tokenizer]:
    """Embedding rows = tokenizer length + 3 (a real Qwen2.5 pads its 151,665 tokens to 152,064 rows)."""
    tok = qwen2_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok) + 3, tie_word_embeddings=tie, eos_token_id=tok.convert_tokens_to_ids(
        "<|endoftext|>"), **{**LLM, **over})
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), cfg.eos_token_id]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def make_siglip(folder: Path, seed: int = 1, shard: bool = True) -> SiglipModel:
    """Two towers, as google/siglip-* ships them; sharded into a set with model.safetensors.index.json."""
    torch.manual_seed(seed)
    text = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": 1, "bos_token_id": 2,
            "eos_token_id": 3}
    model = SiglipModel(SiglipConfig(vision_config=VISION, text_config=text)).eval()
    model.save_pretrained(folder, max_shard_size="200KB" if shard else "5GB")
    return model


def make_whisper(folder: Path, seed: int = 2) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=64, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                        max_target_positions=32, pad_token_id=1, bos_token_id=2, eos_token_id=3,
                        decoder_start_token_id=2, **AUDIO)
    model = WhisperForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    return model


def make_parts(root: Path) -> dict[str, Path]:
    """All three under `root`: {"llm": ..., "vision": ..., "audio": ...}."""
    folders = {p: root / p for p in ("llm", "vision", "audio")}
    make_llm(folders["llm"])
    make_siglip(folders["vision"])
    make_whisper(folders["audio"])
    return folders
