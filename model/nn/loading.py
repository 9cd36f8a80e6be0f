"""Weights straight into place: a model built on the meta device (no memory) gets each tensor read
from safetensors, in the dtype asked for, assigned where its meta placeholder was. Peak memory is
about one copy of the weights plus the largest tensor being converted.

    files = TensorFiles(folder)                        # model.safetensors, or a sharded set + index
    report = load_tensors(model, files, rename, dtype)  # rename: checkpoint key -> our name / DROP / None
    initialise_missing(model, dtype)                    # whatever is still on meta: its own init

`rename` can also leave out what another rank owns (return DROP), so every rank of a distributed
job can load only its share. The report says what was loaded and what was left to initialise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.nn.hf import DROP

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


class TensorFiles:
    """The safetensors weights of one folder: `model.safetensors` or shards listed by its index."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            self.file_of = {k: self.folder / f for k, f in weight_map.items()}
        elif (self.folder / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(self.folder / SINGLE), framework="pt") as f:
                self.file_of = {k: self.folder / SINGLE for k in f.keys()}  # noqa: SIM118 - not a dict
        else:
            raise FileNotFoundError(f"{self.folder}: no {SINGLE} or {INDEX} (only safetensors weights are read)")

    @property
    def keys(self) -> list[str]:
        return list(self.file_of)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.file_of.values()))

    def dtype(self) -> torch.dtype:
        """The dtype most of the floating-point weights are stored in."""
        from safetensors import safe_open

        counts: dict[torch.dtype, int] = {}
        for path, keys in self._by_file(self.keys):
            with safe_open(str(path), framework="pt") as f:
                for k in keys:
                    s = f.get_slice(k)
                    dt = _DTYPES.get(s.get_dtype())
                    if dt is not None:
                        counts[dt] = counts.get(dt, 0) + _numel(s.get_shape())
        return max(counts, key=counts.get) if counts else torch.float32

    def _by_file(self, keys: list[str]) -> list[tuple[Path, list[str]]]:
        groups: dict[Path, list[str]] = {}
        for k in keys:
            groups.setdefault(self.file_of[k], []).append(k)
        return list(groups.items())

    def read(self, keys: list[str], dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor once, shard by shard; floating ones converted to `dtype`."""
        from safetensors import safe_open

        for path, group in self._by_file(keys):
            with safe_open(str(path), framework="pt") as f:
                for k in group:
                    t = f.get_tensor(k)
                    yield k, t.to(dtype) if dtype is not None and t.is_floating_point() else t


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class LoadReport:
    """What one `load_tensors` call did, in our names (checkpoint names for `dropped`/`unexpected`)."""

    loaded: list[str] = field(default_factory=list)
    parameters: int = 0  # elements loaded
    dropped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    grown: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (checkpoint rows, rows now)


def _slot(model: nn.Module, name: str) -> tuple[nn.Module, str, torch.Tensor | None]:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    current = owner._parameters.get(leaf, owner._buffers.get(leaf))
    return owner, leaf, current


def place(model: nn.Module, name: str, tensor: torch.Tensor, loaded: bool = True) -> None:
    """Put `tensor` in the parameter or buffer slot `name`, keeping the slot's requires_grad. A loaded
    tensor is flagged so that transformers' init functions leave it alone."""
    owner, leaf, current = _slot(model, name)
    if leaf in owner._parameters:
        tensor = nn.Parameter(tensor, requires_grad=current.requires_grad)
        owner._parameters[leaf] = tensor
    else:
        owner._buffers[leaf] = tensor
    if loaded:
        tensor._is_hf_initialized = True


def load_tensors(model: nn.Module, files: TensorFiles, rename: Callable[[str], str | None], dtype: torch.dtype,
                 grow_rows: frozenset[str] = frozenset()) -> LoadReport:
    """Assign every checkpoint tensor `rename` maps into `model` (built on the meta device), converted
    to `dtype`. Names in `grow_rows` may have fewer rows in the checkpoint (embeddings for added
    tokens): the checkpoint's rows are copied and the rest zeroed, for the caller to initialise."""
    report = LoadReport()
    wanted: dict[str, str] = {}
    for key in files.keys:
        ours = rename(key)
        if ours is None:
            report.unexpected.append(key)
        elif ours == DROP:
            report.dropped.append(key)
        else:
            wanted[key] = ours
    expected = dict(model.state_dict(keep_vars=True))
    if unknown := [k for k, ours in wanted.items() if ours not in expected]:
        report.unexpected += unknown
    if report.unexpected:
        return report  # the caller reports them before anything is read
    for key, tensor in files.read(list(wanted), dtype):
        ours = wanted[key]
        target = expected[ours]
        if tensor.shape != target.shape:
            tensor = _grow(ours, tensor, target, grow_rows, report)
        place(model, ours, tensor)
        report.loaded.append(ours)
        report.parameters += tensor.numel()
    return report


def _grow(name: str, tensor: torch.Tensor, target: torch.Tensor, grow_rows: frozenset[str],
          report: LoadReport) -> torch.Tensor:
    rows, ckpt_rows = target.shape[0], tensor.shape[0]
    if name not in grow_rows or tensor.shape[1:] != target.shape[1:] or ckpt_rows > rows:
        raise ValueError(f"{name}: the checkpoint's tensor is {tuple(tensor.shape)}, the model expects "
                         f"{tuple(target.shape)}: the config does not describe this checkpoint")
    grown = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
    grown[:ckpt_rows] = tensor
    report.grown[name] = (ckpt_rows, rows)
    return grown


def still_meta(model: nn.Module) -> list[str]:
    """Parameters and persistent buffers not yet loaded."""
    return [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]


def initialise_missing(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Tie what the configs tie, then give everything still on the meta device real memory and its
    module's own initialisation (transformers' `initialize_weights` skips what was loaded; plain torch
    modules reset). Floating parameters get `dtype`; buffers (RoPE frequencies, position ids) keep
    their own. Returns the names initialised here."""
    from transformers import PreTrainedModel

    hf_roots = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    for root in hf_roots:
        root.tie_weights()
    params = {n for n, _ in model.named_parameters()}
    fresh = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    for name in fresh:
        current = _slot(model, name)[2]
        as_dtype = dtype if name in params and current.is_floating_point() else current.dtype
        place(model, name, torch.empty_like(current, device="cpu", dtype=as_dtype), loaded=False)
    if not fresh:
        return fresh
    for root in hf_roots:
        for m in root.modules():
            m.__dict__.pop("_is_hf_initialized", None)  # flags set while built on meta would skip whole modules
        root.initialize_weights()
    under_hf = {id(m) for root in hf_roots for m in root.modules()}
    for mname, module in model.named_modules():
        own = [f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False)]
        if id(module) not in under_hf and hasattr(module, "reset_parameters") and set(own) & set(fresh):
            module.reset_parameters()
    return fresh
