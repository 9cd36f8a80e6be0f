"""The omni checkpoint format: a folder with `omni_config.json` (the model config, vocabulary size
and media token ids), `model.safetensors` (every weight, tied ones stored once each) and
`tokenizer/` (the tokenizer's own `save_pretrained` files).

Names only at import time: data prep and the lifecycle steps read the layout without paying for
torch; the tensor helpers import it when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR = "omni_config.json", "model.safetensors", "tokenizer"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_meta(path: str | Path) -> dict:
    """`omni_config.json`: {"model": ModelConfig fields, "vocab_size", "media_token_ids"}."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{path}: not an omni checkpoint (no {CONFIG_FILE})")
    return json.loads(config.read_text())


def write_meta(path: str | Path, meta: dict) -> None:
    (Path(path) / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    cpu = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(_untie(cpu), str(Path(path) / WEIGHTS_FILE))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / WEIGHTS_FILE))


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): store a copy."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
