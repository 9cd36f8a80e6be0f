"""Parameter counts and a per-GPU memory plan for a stage under DeepSpeed ZeRO-2 / ZeRO-3.

The model is built on the meta device (no memory), so the paper-size configuration can be planned
on a laptop. Bytes per parameter follow mixed-precision Adam (ZeRO paper, Rajbhandari et al.):
bf16 weights (2) + bf16 gradients (2) + fp32 master weights, momentum and variance (12) for
trainable parameters; frozen ones cost only their bf16 weights.

Activations are what the Qwen2 decoder layers of `transformers` save for backward, counted tensor
by tensor (see `llm_layer_bytes`), and the LM head + loss at their peak (`head_bytes`): the plain
loss holds ~12 bytes per logit, the chunked loss (model.nn.loss) one chunk's worth. The formulas
are checked against measured peak memory on CPU (tests/model/nn/test_plan.py). Encoder (SigLIP,
Whisper) activations are not counted: the plan is the LLM's, which dominates at these shapes.

Attention's own state depends on the route (`attention_route`): the packed-row kernels (flash-attn,
torch's varlen, flex) keep O(s), a log-sum-exp per head and token; sdpa with a mask (padded
batches, packed rows without such a kernel) also holds the (batch, 1, s, s) mask and, per layer,
its additive copy that the memory-efficient kernel saves for backward: O(s^2); eager keeps the
(batch, heads, s, s) probabilities per layer.

Activation checkpointing set to "auto" in a stage is decided here (`checkpointing_needed`): on when
the stage does not fit the GPU without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import MODULES, LoraConfig, ModelConfig, StageConfig

GIB = 1024**3
DEFAULT_GPU_GIB = 80.0
FIT = 0.9  # of a GPU's memory a plan may take: the rest is CUDA context, buffers, fragmentation


@dataclass
class StagePlan:
    stage: str
    zero_stage: int
    gpus: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    head_gib: float = 0.0  # the LM head + loss part of activations_gib (at its own peak)
    loss: str = "plain"  # "plain" or "chunked <tokens>"

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.gradients_gib + self.optimizer_gib + self.activations_gib


def meta_model(cfg: ModelConfig):
    """The configured model on the meta device; architecture from `model.init`'s checkpoints where given."""
    from model.nn.hf import embedding_rows
    from model.nn.omni import OmniModel
    from model.nn.sources import resolve, start_tokenizer, tokenizer_source

    tokens = len(start_tokenizer(cfg)) if tokenizer_source(cfg) else cfg.tokenizer.vocab_size
    cfg = resolve(cfg)
    with torch.device("meta"):
        return OmniModel(cfg, embedding_rows(cfg, tokens), {"image": 0, "video": 1, "audio": 2})


def parameter_counts(cfg: ModelConfig, model=None) -> dict[str, int]:
    """Parameters per module of the configured model, counted on the meta device."""
    model = model or meta_model(cfg)
    return {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in MODULES}


def adapter_parameters(llm: torch.nn.Module, lora: LoraConfig) -> int:
    """Parameters LoRA adds: rank x (in + out) per targeted linear layer of the LLM."""
    targets = set(lora.target_modules)
    return sum(lora.rank * (m.in_features + m.out_features) for name, m in llm.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def llm_layer_bytes(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """Bytes one Qwen2 decoder layer saves for backward, per token. Each RMSNorm keeps its input upcast
    to fp32, the normalised input and its output (the next linears' input); attention keeps q, k, v
    (k and v at the KV width: grouped-query attention) and its output; the SwiGLU MLP keeps the gate,
    the up projection, SiLU(gate) and their product (4 x intermediate)."""
    m, e = cfg.llm, dtype_bytes
    kv = m.hidden_size // m.num_attention_heads * m.num_key_value_heads
    norms = 2 * (4 * m.hidden_size + 2 * e * m.hidden_size)
    attention = e * (2 * m.hidden_size + 2 * kv)
    return norms + attention + 4 * e * m.intermediate_size


def head_bytes(cfg: ModelConfig, tokens: int, dtype_bytes: int = 2) -> int:
    """Peak bytes of the LM head and loss. Plain: the logits, their fp32 copy and the saved
    log-softmax in forward, then the log-softmax with its gradient in and out in backward (~12 bytes
    per logit). Chunked: one chunk's logits recomputed, with the same fp32 tensors (~e + 16 bytes per
    logit of the chunk), plus the gathered hidden states of the target positions."""
    vocab = cfg.llm.vocab_size or cfg.tokenizer.vocab_size
    chunk = cfg.loss_chunk(vocab)
    if not chunk:
        return max(dtype_bytes + 8, 12) * tokens * vocab
    return (dtype_bytes + 16) * min(chunk, tokens) * vocab + dtype_bytes * tokens * cfg.llm.hidden_size


ROUTES = ("kernel", "mask", "probs")  # O(s) kernel state, sdpa with a (s x s) mask, eager's probabilities


def attention_route(cfg: ModelConfig, stage: StageConfig) -> str:
    """How the LLM's attention runs in `stage` on a GPU: "kernel" (packed rows through a kernel that
    takes document bounds), "mask" (sdpa with a seq x seq mask) or "probs" (eager)."""
    from model.nn.attention import PACKED_KERNELS

    kernel = planned_kernel(cfg)
    if kernel == "eager":
        return "probs"
    if kernel == "flash_attention_2" or (stage.packing and kernel in PACKED_KERNELS):
        return "kernel"  # flash-attn unpads padded batches too; varlen/flex take packed rows
    return "mask"


def planned_kernel(cfg: ModelConfig) -> str:
    """`model.attn_implementation` as a bf16 GPU with this software would resolve it (the plan is
    for GPUs, wherever it is printed)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        return "flash_attention_2"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "varlen"


def attention_state_bytes(cfg: ModelConfig, seq_len: int, micro_batch: int, route: str,
                          dtype_bytes: int = 2) -> tuple[float, float]:
    """(bytes every layer keeps, bytes held once) of attention state beyond q, k, v and the output."""
    if route not in ROUTES:
        raise ValueError(f"attention route {route!r}: choose from {', '.join(ROUTES)}")
    m, tokens = cfg.llm, seq_len * micro_batch
    per_layer = 4 * m.num_attention_heads * tokens  # fp32 log-sum-exp per head and token: O(s)
    square = micro_batch * seq_len * seq_len
    if route == "mask":
        return per_layer + dtype_bytes * square, square  # the additive copy per layer; the bool mask once
    if route == "probs":
        return per_layer + 2 * dtype_bytes * m.num_attention_heads * square, square
    return per_layer, 0


def activation_bytes(cfg: ModelConfig, seq_len: int, micro_batch: int, checkpointing: bool,
                     dtype_bytes: int = 2, route: str = "kernel") -> float:
    """Peak activation bytes of one micro-batch, at the start of backward: every layer's saved
    tensors (attention's state by `route`) and the head's peak; with activation checkpointing, every
    layer's input plus the larger of the head's peak and one layer being recomputed (they happen
    one after the other)."""
    tokens, layers = seq_len * micro_batch, cfg.llm.num_hidden_layers
    attention, shared = attention_state_bytes(cfg, seq_len, micro_batch, route, dtype_bytes)
    layer = llm_layer_bytes(cfg, dtype_bytes) * tokens + attention
    head = head_bytes(cfg, tokens, dtype_bytes)
    if checkpointing:
        return layers * dtype_bytes * cfg.llm.hidden_size * tokens + max(head, layer) + shared
    return layers * layer + head + shared


def plan_stage(cfg: ModelConfig, stage: StageConfig, zero_stage: int, gpus: int, seq_len: int | None = None,
               micro_batch: int | None = None, checkpointing: bool | str | None = None,
               counts: dict[str, int] | None = None, adapters: int = 0) -> StagePlan:
    """Per-GPU memory of one stage; `checkpointing=None` takes the stage's activation_checkpointing
    ("auto": as `checkpointing_needed` decides for 80 GiB GPUs). With LoRA (`adapters` = its
    parameter count), the LLM's own weights are frozen and the adapters carry weights, gradients and
    Adam states instead."""
    counts = counts or parameter_counts(cfg)
    total = sum(counts.values()) + adapters
    trainable = sum(counts[m] for m in stage.trainable if not (stage.lora and m == "llm")) + adapters
    weights = 2 * total / (gpus if zero_stage >= 3 else 1)
    grads = 2 * trainable / (gpus if zero_stage >= 2 else 1)
    optimizer = 12 * trainable / (gpus if zero_stage >= 1 else 1)
    checkpointing = stage.activation_checkpointing if checkpointing is None else checkpointing
    seq_len, micro_batch = seq_len or cfg.max_seq_len, micro_batch or stage.micro_batch_size
    if checkpointing == "auto":
        checkpointing = checkpointing_needed(cfg, stage, zero_stage, gpus, DEFAULT_GPU_GIB, seq_len, micro_batch,
                                             counts, adapters)
    acts = activation_bytes(cfg, seq_len, micro_batch, checkpointing, route=attention_route(cfg, stage))
    head = head_bytes(cfg, seq_len * micro_batch)
    chunk = cfg.loss_chunk(cfg.llm.vocab_size or cfg.tokenizer.vocab_size)
    return StagePlan(stage.name, zero_stage, gpus, weights / GIB, grads / GIB, optimizer / GIB, acts / GIB,
                     head / GIB, f"chunked {chunk}" if chunk else "plain")


def checkpointing_needed(cfg: ModelConfig, stage: StageConfig, zero_stage: int, gpus: int, gpu_gib: float,
                        seq_len: int | None = None, micro_batch: int | None = None,
                        counts: dict[str, int] | None = None, adapters: int = 0) -> bool:
    """True when the stage's plan without activation checkpointing does not fit `gpu_gib` (the one
    rule that turns a stage's `activation_checkpointing: auto` on or off)."""
    plan = plan_stage(cfg, stage, zero_stage, gpus, seq_len, micro_batch, False, counts, adapters)
    return plan.total_gib >= FIT * gpu_gib


def stage_checkpointing(model, stage: StageConfig) -> bool:
    """`stage.activation_checkpointing` for the model about to train here: as configured, or for
    "auto" the plan's answer on this rank's GPU (its memory, the world size, rows of max_seq_len).
    On a CPU "auto" is off: host memory is not what the plan budgets."""
    from model import runtime

    if stage.activation_checkpointing != "auto":
        return stage.activation_checkpointing
    device = runtime.device()
    if device.type != "cuda":
        return False
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    def size(p) -> int:
        return getattr(p, "ds_numel", p.numel())  # ds_numel: a ZeRO-3-partitioned parameter's full size

    counts = {name: sum(size(p) for p in getattr(model, name).parameters()) for name in MODULES}
    adapters = sum(size(p) for n, p in model.llm.named_parameters() if "lora_" in n)  # peft's attached adapters
    counts["llm"] -= adapters
    return checkpointing_needed(model.cfg, stage, stage.zero_stage, runtime.ranks().world_size, gpu_gib,
                                counts=counts, adapters=adapters)


def format_plan(cfg: ModelConfig, stages: list[StageConfig], gpus: int, gpu_gib: float, micro_batch: int | None = None,
                checkpointing: bool | str | None = None) -> str:
    """The parameter table and a ZeRO-2/ZeRO-3 row per stage; `micro_batch=None` takes each stage's
    configured micro_batch_size (the `mb` column)."""
    model = meta_model(cfg)
    counts = parameter_counts(cfg, model)
    ranks = {s.name: s.lora.rank for s in stages if s.lora}
    adapters = {s.name: adapter_parameters(model.llm, s.lora) for s in stages if s.lora}
    lines = [f"model {cfg.name}: {sum(counts.values()) / 1e9:.3f}B parameters"]
    lines += [f"  {name:<17}{n / 1e6:>10.1f}M" for name, n in counts.items()]
    lines += [f"  LoRA on llm ({name}){n / 1e6:>6.1f}M  rank {ranks[name]}" for name, n in adapters.items()]
    batch = "micro-batch per stage (mb)" if micro_batch is None else f"micro-batch {micro_batch}"
    chunk = cfg.loss_chunk(cfg.llm.vocab_size or cfg.tokenizer.vocab_size)
    loss = f"chunked loss ({chunk} tokens per chunk)" if chunk else "plain loss (full logits)"
    lines.append(f"\nper-GPU memory on {gpus} GPUs x {gpu_gib:g} GiB, {batch}, seq "
                 f"{cfg.max_seq_len}, bf16 + fp32 Adam, {loss} (ckpt: activation checkpointing; activ "
                 "includes head, the LM head + loss at its peak; encoder activations not counted; *: the stage's "
                 "activation_checkpointing is auto, this is the plan's choice)")
    lines.append(f"  {'stage':<11}{'ZeRO':>5}{'mb':>4}{'ckpt':>5}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}"
                 f"{'head':>8}{'total':>8}  fits")
    for stage in stages:
        mb = micro_batch or stage.micro_batch_size
        for zero in (2, 3):
            ckpt = stage.activation_checkpointing if checkpointing is None else checkpointing
            auto = ckpt == "auto"
            if auto:
                ckpt = checkpointing_needed(cfg, stage, zero, gpus, gpu_gib, micro_batch=mb, counts=counts,
                                            adapters=adapters.get(stage.name, 0))
            p = plan_stage(cfg, stage, zero, gpus, micro_batch=mb, checkpointing=ckpt, counts=counts,
                           adapters=adapters.get(stage.name, 0))
            fits = "yes" if p.total_gib < FIT * gpu_gib else "NO"
            shown = ("on" if ckpt else "off") + ("*" if auto else "")
            lines.append(
                f"  {stage.name:<11}{zero:>5}{mb:>4}{shown:>5}{p.weights_gib:>9.1f}"
                f"{p.gradients_gib:>8.1f}{p.optimizer_gib:>8.1f}{p.activations_gib:>8.1f}{p.head_gib:>8.1f}"
                f"{p.total_gib:>8.1f}  {fits}"
            )
    return "\n".join(lines)
