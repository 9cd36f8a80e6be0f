"""The trained LLM out again as a plain Hugging Face folder (`omni model export-hf`):
`Qwen2ForCausalLM` weights + config.json + generation_config.json (our stop ids) + the tokenizer
with the tokens we added, so `AutoModelForCausalLM.from_pretrained(folder)` and other engines
(vLLM, llama.cpp converters, ...) take it as is. Only the LLM's tensors are read."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2ForCausalLM

from model.config import ModelConfig
from model.nn import checkpoint
from model.nn.hf import DROP, hf_configs
from model.nn.loading import TensorFiles, initialise_missing, load_tensors
from model.text.tokenizer import load_tokenizer


def export_llm(checkpoint_dir: str | Path, out_dir: str | Path, max_shard_size: int | str = "5GB") -> dict:
    """Write the omni checkpoint's LLM to `out_dir`; returns what was written."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    meta = checkpoint.read_meta(checkpoint_dir)
    cfg = ModelConfig(**meta["model"]).model_copy(update={"attn_implementation": "sdpa"})
    llm_cfg = hf_configs(cfg, meta["vocab_size"])[2]
    tok = load_tokenizer(checkpoint_dir / checkpoint.TOKENIZER_DIR)
    stops = meta.get("stop_token_ids") or [tok.eos_token_id]
    llm_cfg.eos_token_id, llm_cfg.pad_token_id = stops[0], tok.pad_token_id
    files = TensorFiles(checkpoint_dir)
    with torch.device("meta"):
        llm = Qwen2ForCausalLM(llm_cfg)
    expected = set(llm.state_dict())
    report = load_tensors(llm, files, lambda k: k[4:] if k.startswith("llm.") and k[4:] in expected else DROP,
                          files.dtype())
    if missing := [n for n in initialise_missing(llm, files.dtype()) if n in expected]:
        raise ValueError(f"{checkpoint_dir}: the LLM's tensors {missing[:5]} are missing")
    llm.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=tok.pad_token_id,
                                             bos_token_id=llm_cfg.bos_token_id)
    llm.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    tok.save_pretrained(str(out_dir))
    added = tok.get_added_vocab()
    return {"out": str(out_dir), "architecture": "Qwen2ForCausalLM", "parameters": report.parameters,
            "dtype": str(files.dtype()).removeprefix("torch."), "vocab_rows": meta["vocab_size"],
            "tokenizer_tokens": len(tok), "added_tokens": len(added), "eos_token_id": stops}
