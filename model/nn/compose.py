"""An omni checkpoint composed from pretrained Hugging Face parts (`omni model compose`, init-model).

    report = compose(model_cfg, "ckpt/")   # model.init.llm / vision / audio: folders or s3:// URIs

1. the architecture comes from each part's config.json (`model.nn.sources.resolve`): a YAML value
   that disagrees fails before any weight is read;
2. the model is built on the meta device for the loaded parts, and every tensor is read straight
   into place in the checkpoint's dtype (`model.nn.loading`), so peak memory is about one copy;
3. tensors map by name (`model.nn.hf.our_key`): SigLIP's text tower and head, Whisper's decoder are
   dropped; anything else the model does not have, or lacks, is an error naming the first keys;
4. the LLM's tokenizer gets our special tokens; the embedding (and an untied LM head) gets
   max(checkpoint rows, tokenizer length) rows: the checkpoint's rows stay as they are, and the rows
   of the tokens we added start at the mean of the original tokens' rows (Hewitt, "Initializing new
   word embeddings", 2021: the added tokens then barely shift the model's output distribution);
5. only the projectors, the rows of added tokens and parts with no source are freshly initialised.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import ModelConfig
from model.nn.hf import embedding_rows, our_key
from model.nn.loading import LoadReport, TensorFiles, initialise_missing, load_tensors
from model.nn.omni import OmniModel
from model.nn.sources import fetch, is_remote, read_json, resolve, start_tokenizer
from model.text.tokenizer import BASE_CORPUS, MEDIA_SPECIAL, stop_ids, train_tokenizer

MODULE_OF = {"llm": "llm", "vision": "vision_tower", "audio": "audio_encoder"}
PROJECTORS = ("vision_projector", "video_projector", "audio_projector")
ROW_TENSORS = frozenset({"llm.model.embed_tokens.weight", "llm.lm_head.weight"})
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class PartResult:
    source: str | None
    tensors_loaded: int = 0
    parameters_loaded: int = 0
    tensors_dropped: int = 0
    new_parameters: int = 0
    new_rows: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"source": self.source, "tensors_loaded": self.tensors_loaded, "parameters_loaded":
                self.parameters_loaded, "tensors_dropped": self.tensors_dropped, "new_parameters": self.new_parameters,
                "new_rows": len(self.new_rows)}


def compose(cfg: ModelConfig, out: str | Path, tokenizer=None, seed: int = 0, max_shard_size: int | str = "5GB",
            log=lambda line: None) -> dict:
    """Write an omni checkpoint to `out` (a folder or s3://) from `cfg.init`'s parts; `tokenizer`
    (data prep's) wins over the LLM's own. Returns the report: per part what was loaded, dropped and
    newly initialised."""
    resolved = resolve(cfg)  # config.json only: a disagreement fails before any weight is read
    sources = cfg.init.sources()
    with tempfile.TemporaryDirectory(prefix="omni-compose-") as tmp:
        folders = {p: fetch(uri, Path(tmp) / p, want=lambda k: "/" not in k) for p, uri in sources.items()}
        files = {p: TensorFiles(folder) for p, folder in folders.items()}
        tok = tokenizer if tokenizer is not None else start_tokenizer(cfg)
        tok = tok if tok is not None else train_tokenizer(BASE_CORPUS, cfg.tokenizer.vocab_size)
        dtype = _dtype(cfg, files)
        log(f"composing {', '.join(f'{p} <- {u}' for p, u in sources.items()) or 'fresh weights'} in {dtype}")
        torch.manual_seed(seed)
        model = OmniModel(resolved, embedding_rows(resolved, len(tok)), _placeholders(tok),
                          on_meta=[MODULE_OF[p] for p in sources], stop_token_ids=_stop_ids(tok, sources))
        for p in (p for p in MODULE_OF if p not in sources):
            _cast(getattr(model, MODULE_OF[p]), dtype)
        for name in PROJECTORS:
            _cast(getattr(model, name), dtype)
        results = {p: _load_part(model, p, sources[p], files[p], dtype, log) for p in sources}
        _check_complete(model, initialise_missing(model, dtype), sources)
        if "llm" in sources:
            results["llm"].new_rows = _init_added_rows(model, tok, _source_vocab(folders["llm"]))
        _save(model, tok, out, max_shard_size)
    return _report(model, results, out, dtype, len(tok))


def _dtype(cfg: ModelConfig, files: dict[str, TensorFiles]) -> torch.dtype:
    if cfg.init.dtype != "auto":
        return DTYPES[cfg.init.dtype]
    first = files.get("llm") or next(iter(files.values()), None)
    return first.dtype() if first else torch.float32


def _placeholders(tok) -> dict[str, int]:
    return {kind: tok.convert_tokens_to_ids(triple[1]) for kind, triple in MEDIA_SPECIAL.items()}


def _stop_ids(tok, sources: dict[str, str]) -> list[int]:
    """`<|im_end|>`, the tokenizer's eos, and the LLM checkpoint's eos from config.json and generation_config.json."""
    eos = []
    for name in ("config.json", "generation_config.json") if "llm" in sources else ():
        try:
            value = read_json(sources["llm"], name).get("eos_token_id")
        except FileNotFoundError:
            continue
        eos += value if isinstance(value, list) else [value]
    return stop_ids(tok, [e for e in eos if e is not None])


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters only: buffers such as RoPE frequencies keep fp32."""
    for p in module.parameters():
        p.data = p.data.to(dtype)


def _load_part(model: OmniModel, part: str, uri: str, files: TensorFiles, dtype: torch.dtype, log) -> PartResult:
    report: LoadReport = load_tensors(model, files, lambda k: our_key(part, k), dtype,
                                      grow_rows=ROW_TENSORS if part == "llm" else frozenset())
    if report.unexpected:
        raise ValueError(f"model.init.{part} ({uri}): {len(report.unexpected)} tensors the {part} does not have, "
                         f"e.g. {report.unexpected[:5]}: not a {part} checkpoint of the expected layout")
    log(f"  {part}: {len(report.loaded)} tensors, {report.parameters / 1e6:.1f}M parameters loaded, "
        f"{len(report.dropped)} dropped ({', '.join(sorted({k.split('.')[0] for k in report.dropped})) or 'none'})")
    return PartResult(uri, len(report.loaded), report.parameters, len(report.dropped))


def _check_complete(model: OmniModel, fresh: list[str], sources: dict[str, str]) -> None:
    """Loaded parts must be whole: only their non-persistent buffers (RoPE, position ids) may be new."""
    persistent = set(model.state_dict())
    for part in sources:
        prefix = MODULE_OF[part] + "."
        if missing := [n for n in fresh if n.startswith(prefix) and n in persistent]:
            raise ValueError(f"model.init.{part} ({sources[part]}): {len(missing)} tensors missing from the "
                             f"checkpoint, e.g. {missing[:5]}")


def _source_vocab(folder: Path) -> int | None:
    """How many tokens the LLM's own tokenizer has (the rows our added tokens come after)."""
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(str(folder)))
    except (OSError, ValueError):  # no tokenizer next to the weights: the checkpoint's rows are all original
        return None


@torch.no_grad()
def _init_added_rows(model: OmniModel, tok, source_vocab: int | None) -> list[int]:
    """Rows of tokens the LLM's tokenizer did not have, and rows past the checkpoint's: the mean of
    the original tokens' rows. Every other row is the checkpoint's, untouched."""
    llm = model.llm
    tables = [llm.get_input_embeddings().weight]
    if llm.lm_head.weight is not tables[0]:
        tables.append(llm.lm_head.weight)
    ckpt_rows = model.cfg.llm.vocab_size
    original = min(source_vocab or ckpt_rows, ckpt_rows)
    rows = sorted(set(range(original, len(tok))) | set(range(ckpt_rows, model.vocab_size)))
    for table in tables:
        table[rows] = table[:original].float().mean(0).to(table.dtype)
    return rows


def _save(model: OmniModel, tok, out: str | Path, max_shard_size: int | str) -> None:
    if not is_remote(str(out)):
        model.save_pretrained(out, tok, max_shard_size)
        return
    from model.storage import open_store

    with tempfile.TemporaryDirectory(prefix="omni-compose-out-") as staging:
        model.save_pretrained(staging, tok, max_shard_size)
        open_store(str(out)).upload_dir(staging)


def _report(model: OmniModel, results: dict[str, PartResult], out, dtype: torch.dtype, tokens: int) -> dict:
    counts = {}
    for part, module in MODULE_OF.items():
        result = results.get(part) or PartResult(None)
        if result.source is None:
            result.new_parameters = sum(p.numel() for p in getattr(model, module).parameters())
        elif result.new_rows:
            result.new_parameters = len(result.new_rows) * model.cfg.llm.hidden_size * (
                1 if model.cfg.llm.tie_word_embeddings else 2)
        counts[part] = result.to_json()
    projector_params = sum(p.numel() for n in PROJECTORS for p in getattr(model, n).parameters())
    counts["projectors"] = {"new_parameters": projector_params}
    return {**counts, "out": str(out), "dtype": str(dtype).removeprefix("torch."), "vocab_rows": model.vocab_size,
            "tokenizer_tokens": tokens}
