"""The omni checkpoint format: a folder with `omni_config.json` (the model config, embedding rows,
media token ids and generation stop ids), the weights as Hugging Face lays them out
(`model.safetensors`, or shards `model-0000i-of-0000n.safetensors` listed by
`model.safetensors.index.json`; a tied weight is stored once) and `tokenizer/` (the tokenizer's own
`save_pretrained` files).

Names only at import time: data prep and the lifecycle steps read the layout without paying for
torch; the tensor helpers import it when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CONFIG_FILE, TOKENIZER_DIR = "omni_config.json", "tokenizer"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_meta(path: str | Path) -> dict:
    """`omni_config.json`: {"model": ModelConfig fields, "vocab_size" (embedding rows), "media_token_ids",
    "stop_token_ids"}."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{path}: not an omni checkpoint (no {CONFIG_FILE})")
    return json.loads(config.read_text())


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder, in name order (one file, or the shards and their index)."""
    return sorted(Path(path).glob("model*.safetensors*"))


def weights_sha256(path: str | Path) -> str:
    """One hash of a checkpoint's weights: every weight file's name and bytes, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for file in weight_files(path):
        digest.update(file.name.encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def write_meta(path: str | Path, meta: dict) -> None:
    (Path(path) / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def save_weights(state: dict[str, torch.Tensor], path: str | Path, max_shard_size: int | str = "5GB") -> list[str]:
    """Write `state` as one file or shards of at most `max_shard_size` (safetensors writes from the
    tensors' memory: no second copy). Returns the file names."""
    from huggingface_hub import save_torch_state_dict

    path = Path(path)
    for old in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a re-save with another shard count must not leave stale shards
    cpu = _own_storage({k: v.detach().contiguous().cpu() for k, v in _drop_aliases(state).items()})
    save_torch_state_dict(cpu, str(path), max_shard_size=max_shard_size)
    return sorted(p.name for p in path.glob("model*.safetensors*"))


def _own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses views into a shared buffer (DeepSpeed leaves parameters in flat ones):
    those are copied; tensors that own their memory (a composed or loaded model) are written as they are."""
    seen, out = set(), {}
    for k, v in state.items():
        storage = v.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != v.numel() * v.element_size()
        out[k] = v.clone() if shared else v
        seen.add(storage.data_ptr())
    return out


def _drop_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tied weight (the LM head sharing the embedding) is stored once, under its first name; the
    loader ties it again from the config."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            out[k] = v
        seen.add(key)
    return out
