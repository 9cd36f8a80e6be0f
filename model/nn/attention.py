"""Packed-row attention from PyTorch itself, registered with transformers' attention registry.

Two kernels see a packed row as what it is, documents laid end to end, and never build the
(seq x seq) block-diagonal mask the plain route needs (model.data.packing):

- `varlen`: `torch.nn.attention.varlen.varlen_attn`, FlashAttention's variable-length kernel shipped
  in torch (CUDA only): one unpadded row, document bounds as cumulative lengths (`cu_seq_lens_q`).
  It plans nothing per shape, so rows of any length cost no host time.
- `flex`: FlexAttention with a causal document mask built from the same bounds (a `BlockMask`: only
  the blocks on the diagonal are computed). Compiled on CUDA; its forward also runs eagerly on a CPU
  (backward is CUDA-only). A compiled kernel is specialised to its sequence length, so the packing
  collator pads the row to a bucket (`pad_to_bucket`) and a stage compiles a handful of shapes, not
  one per step.

Both take the bounds as the keyword arguments the collator already gives flash-attention
(`cu_seq_lens_q/k`, `max_length_q/k`, computed once per batch: no device-to-host sync in a layer).
Called without them (generation, the padded route, the SFT filter) they run transformers' sdpa with
the mask transformers built, so a checkpoint trained with either kernel serves as before.

What else plans per shape: sdpa with a mask picks cuDNN's attention on Hopper, which builds an
execution plan for every new shape (11-16 ms of host time each). `install` switches that backend
off (`torch.backends.cuda.enable_cudnn_sdp(False)`): sdpa then takes flash or memory-efficient
attention, which plan nothing.

The encoders: SigLIP's tiles all have the same patch count and no mask, so they keep sdpa. Whisper's
audio windows differ in length: with the `varlen` LLM kernel the audio encoder takes the same
kernel and runs its windows unpadded, end to end (model.nn.audio), instead of padded with a mask.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

KERNELS = ("varlen", "flex")  # what this module registers, by model.attn_implementation's names
PACKED_KERNELS = ("flash_attention_2", *KERNELS)  # the LLM kernels that take one unpadded packed row
FLEX_BLOCK = 128  # FlexAttention's default block: a bucket is a whole number of blocks
# Compiled specialisations allowed per code object for flex (its kernel and its block mask): one per
# length bucket, and torch's default of 8 would silently fall back to the unfused O(s^2) path.
FLEX_RECOMPILE_LIMIT = 64


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    """varlen_attn's keyword arguments in this torch: 2.10 says `is_causal`, later ones `window_size`
    and `scale`; `enable_gqa` came in 2.13."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _bounds(kwargs: dict) -> torch.Tensor | None:
    """The documents' bounds: self-attention, so the query's (cu_seq_lens_k, the same values, is not
    compared: on a GPU that would be a host sync in every layer)."""
    return kwargs.get("cu_seq_lens_q")


def _causal(module: torch.nn.Module) -> bool:
    """The LLM's attention is causal; an encoder's (Whisper: `is_causal = False`) is not."""
    return bool(getattr(module, "is_causal", True))


def _check(module: torch.nn.Module, query: torch.Tensor, dropout: float, kwargs: dict) -> None:
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one unpadded row; got a batch of {query.shape[0]} rows "
                         "(collate_packed with explicit_mask=False lays all rows end to end)")
    if dropout:
        raise ValueError("packed attention kernels here run without attention dropout; set attention_dropout=0")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("packed attention kernels here do not implement sliding-window attention; "
                         "use model.attn_implementation=sdpa for a sliding-window LLM")


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (1, heads, tokens, dim), key/value (1, kv_heads, tokens,
    dim) -> (1, tokens, heads, dim). Causal within each document of `cu_seq_lens_q`."""
    cu = _bounds(kwargs)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    _check(module, query, dropout, kwargs)
    _require_cuda(query)
    from torch.nn.attention.varlen import varlen_attn

    accepts, options = _varlen_parameters(), {}
    if query.shape[1] != key.shape[1]:
        if "enable_gqa" in accepts:
            options["enable_gqa"] = True
        else:  # older torch: share the kv heads by repeating them
            groups = query.shape[1] // key.shape[1]
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if "window_size" in accepts:
        options["window_size"] = (-1, 0) if _causal(module) else (-1, -1)  # (-1, 0): causal
    else:
        options["is_causal"] = _causal(module)
    if "scale" in accepts:
        options["scale"] = scaling
    elif scaling is not None:  # the kernel's own scale is 1/sqrt(head_dim)
        query = query * (scaling * query.shape[-1] ** 0.5)
    longest = int(kwargs.get("max_length_q") or query.shape[2])
    bounds = cu.to(query.device, torch.int32)
    out = varlen_attn(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), bounds, bounds,
                      longest, longest, **options)
    return out.unsqueeze(0), None


def _require_cuda(query: torch.Tensor) -> None:
    if not query.is_cuda:
        raise ValueError("model.attn_implementation=varlen runs on CUDA only (torch's varlen_attn); "
                         "use sdpa (or flex, forward only) on a CPU")


def document_block_mask(cu_seq_lens: torch.Tensor, length: int, device: torch.device, causal: bool = True):
    """FlexAttention's BlockMask for documents `cu_seq_lens` bound in a row of `length` tokens, each
    causal within itself (or, `causal=False`, seeing all of itself). Built on the device (compiled
    there on CUDA), once per batch."""
    from torch.nn.attention.flex_attention import create_block_mask

    cu = cu_seq_lens.to(device)
    if cu.numel() < 2:
        raise ValueError("packed attention: cu_seq_lens needs at least one document [0, n]")
    document = torch.searchsorted(cu[1:], torch.arange(length, device=device), right=True)

    def causal_document(b, h, q, kv):
        return (document[q] == document[kv]) & (q >= kv)

    def whole_document(b, h, q, kv):
        return document[q] == document[kv]

    with _flex_recompile_limit():
        return create_block_mask(causal_document if causal else whole_document, None, None, length, length,
                                 device=device, _compile=device.type == "cuda")


def _flex_recompile_limit():
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    return dynamo.patch(**{name: max(FLEX_RECOMPILE_LIMIT, getattr(dynamo, name))})


class _LastMask:
    """The BlockMask of the batch in flight: every layer (and activation checkpointing's recompute)
    receives the same `cu_seq_lens_q` tensor object, so the mask is built once per forward."""

    key: tuple | None = None
    mask = None

    @classmethod
    def get(cls, cu: torch.Tensor, length: int, device: torch.device, causal: bool):
        if cls.key is None or cls.key[0] is not cu or cls.key[1:] != (length, causal):
            cls.key, cls.mask = (cu, length, causal), document_block_mask(cu, length, device, causal)
        return cls.mask


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # one specialisation per bucketed length


def flex_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """As `varlen_attention_forward`, through FlexAttention with a document mask (causal for the LLM);
    compiled on CUDA, eager on a CPU (forward only: FlexAttention has no CPU backward)."""
    cu = _bounds(kwargs)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    _check(module, query, dropout, kwargs)
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = _LastMask.get(cu, query.shape[2], query.device, _causal(module))
    kernel = _compiled_flex() if query.is_cuda else flex_attention
    with _flex_recompile_limit():
        out = kernel(query, key, value, block_mask=block_mask, scale=scaling,
                     enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def unpadded_bounds(lengths: torch.Tensor) -> dict:
    """The kernels' keyword arguments for items of `lengths` (a tensor on the device) laid end to end;
    one host sync for the longest."""
    bounds = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def pad_to_bucket(tokens: int, kernel: str) -> int:
    """The row length a packed row of `tokens` is padded to for `kernel`. The compiled flex kernel:
    up to a multiple of an eighth of the enclosing power of two (at least FLEX_BLOCK), so each
    doubling of length holds 8 shapes and padding adds less than an eighth (or one block).
    Kernels that plan nothing per length: unchanged."""
    if kernel != "flex":
        return tokens
    step = max(FLEX_BLOCK, 1 << max(0, (tokens - 1).bit_length() - 4))
    return -(-tokens // step) * step


def no_mask(config) -> dict:
    """What the LLM's `attention_mask` argument becomes for a packed row bound by cu_seq_lens: the
    per-layer-type mapping transformers accepts as already built, all None, so it neither derives a
    (seq x seq) mask from the restarting position ids nor syncs to detect them."""
    return {kind: None for kind in set(getattr(config, "layer_types", None) or ["full_attention"])}


@functools.cache
def install() -> None:
    """Register the kernels (and sdpa's mask builder for their unpacked calls) with transformers,
    and switch cuDNN's per-shape-planning sdpa backend off. Idempotent."""
    for name, forward in (("varlen", varlen_attention_forward), ("flex", flex_attention_forward)):
        AttentionInterface.register(name, forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
