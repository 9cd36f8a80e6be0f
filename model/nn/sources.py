"""Where a model starts: pretrained Hugging Face parts (`model.init.llm/vision/audio`) or an omni
checkpoint (`model.pretrained`), each a folder or an s3:// URI read through `model.storage`.

    cfg = resolve(model_cfg)          # every architecture value filled from the checkpoints' config.json
    tok = start_tokenizer(model_cfg)  # the tokenizer training and prep use (None: train one)

`resolve` reads only the small config files, so a disagreement between the YAML and a checkpoint
fails before any weight is read, naming the key and both values.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from transformers import AutoConfig, PretrainedConfig

from model.config import FRESH_DEFAULTS, PARTS, ModelConfig
from model.nn.checkpoint import CONFIG_FILE, TOKENIZER_DIR
from model.nn.hf import ARCH_FIELDS, architecture

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".gguf", ".ot")


class ArchitectureMismatch(ValueError):
    """The model config sets a value a checkpoint contradicts."""


def is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme == "s3"


def fetch(uri: str, dest: Path, want=lambda key: True) -> Path:
    """A local folder for `uri`: the folder itself, or the keys `want` accepts downloaded into `dest`."""
    if not is_remote(uri):
        folder = Path(urlsplit(uri).path if uri.startswith("file://") else uri).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{uri}: no such folder")
        return folder
    from model.storage import open_store

    store = open_store(uri)
    keys = [k for k in store.list() if want(k)]
    if not keys:
        raise FileNotFoundError(f"{uri}: nothing there (an empty or mistyped prefix?)")
    for key in keys:
        store.download_file(key, dest / key)
    return dest


def read_json(uri: str, name: str) -> dict:
    """One small JSON file of a folder or s3:// prefix."""
    if is_remote(uri):
        from model.storage import open_store

        return json.loads(open_store(uri).read_bytes(name))
    path = fetch(uri, Path()) / name
    if not path.is_file():
        raise FileNotFoundError(f"{uri}: no {name}")
    return json.loads(path.read_text())


def part_config(uri: str) -> PretrainedConfig:
    """A Hugging Face part's config.json, loaded as its config class (defaults filled in)."""
    raw = read_json(uri, "config.json")
    if "model_type" not in raw:
        raise ValueError(f"{uri}/config.json has no model_type: not a Hugging Face model folder")
    return AutoConfig.for_model(**raw)


def _checkpoint_values(cfg: ModelConfig) -> tuple[dict[str, dict], str]:
    """Architecture values per part from the starting checkpoint(s), and what to call their source."""
    if cfg.pretrained:
        meta = read_json(cfg.pretrained, CONFIG_FILE)
        model = ModelConfig(**meta["model"])
        values = {p: {f: getattr(model.part(p), f) for f in ARCH_FIELDS[p]} for p in PARTS}
        values["llm"]["vocab_size"] = meta["vocab_size"]
        values["audio"]["projector_stride"] = model.audio.projector_stride  # shapes the projector's weights
        return values, f"{cfg.pretrained}/{CONFIG_FILE}"
    return {p: architecture(p, part_config(uri)) for p, uri in cfg.init.sources().items()}, "config.json"


def resolve(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with every architecture value the starting checkpoints fix filled in, and a fresh part's
    defaults elsewhere. A value the config sets that a checkpoint contradicts is an error."""
    values, where = _checkpoint_values(cfg)
    conflicts, update = [], {}
    for part in PARTS:
        ours = cfg.part(part).model_dump()
        theirs = values.get(part, {})
        for key, value in theirs.items():
            if ours.get(key) is not None and ours[key] != value:
                source = where if cfg.pretrained else f"{cfg.init.sources()[part]}/{where}"
                conflicts.append(f"model.{part}.{key}: the config says {ours[key]!r}, {source} says {value!r}")
        filled = ours | {k: v for k, v in theirs.items() if ours.get(k) is None}
        update[part] = filled | {k: v for k, v in FRESH_DEFAULTS[part].items() if filled.get(k) is None}
    if conflicts:
        raise ArchitectureMismatch("the model config disagrees with the checkpoint (remove the key from "
                                   "conf/model or fix it):\n  " + "\n  ".join(conflicts))
    return ModelConfig.model_validate(cfg.model_dump() | update)


def tokenizer_source(cfg: ModelConfig) -> str | None:
    """Where the tokenizer comes from, in order: `tokenizer.path`, the omni checkpoint's, the LLM's."""
    if cfg.tokenizer.path:
        return cfg.tokenizer.path
    if cfg.pretrained:
        return f"{cfg.pretrained.rstrip('/')}/{TOKENIZER_DIR}"
    return cfg.init.llm


def is_weight(key: str) -> bool:
    return key.endswith(WEIGHT_SUFFIXES) or key.endswith(".index.json")


def load_source_tokenizer(uri: str):
    """The tokenizer files of a folder or s3:// prefix (weights are not fetched), with our special tokens."""
    from model.text.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = fetch(uri, Path(tmp), want=lambda k: "/" not in k and not is_weight(k))
        if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
            raise FileNotFoundError(f"{uri}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
        return load_tokenizer(folder)


def start_tokenizer(cfg: ModelConfig):
    """The tokenizer a run starts from (`tokenizer_source`), or None when one is to be trained."""
    source = tokenizer_source(cfg)
    return load_source_tokenizer(source) if source else None
