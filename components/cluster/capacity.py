"""Does the serving endpoint's hardware (conf/cluster `endpoint`, on the GPU pool's machines) fit the
model it will serve? `omni cluster render` prints what does not, before a rollout finds out.

Serving memory: the weights in the serving dtype (bf16 on a GPU, fp32 on a CPU), the KV cache of a
full batch at the model's context, and ~2 GiB for the CUDA context and allocator slack. The host must
also hold the weights while they load.
"""

from __future__ import annotations

import re

from components.config import OmniConfig

GIB = 1024**3
# Memory per GPU of the GKE accelerator types (cluster.gpu_pool.node_pool.gpu_model); a name that
# says its size ("...-80gb") is read from the name.
GPU_GIB = {"nvidia-l4": 24, "nvidia-tesla-t4": 16, "nvidia-tesla-v100": 16, "nvidia-tesla-a100": 40,
           "nvidia-a100-80gb": 80, "nvidia-h100-80gb": 80, "nvidia-h100-mega-80gb": 80, "nvidia-h200-141gb": 141}
CUDA_OVERHEAD = 2 * GIB


def gpu_gib(gpu_model: str | None) -> float | None:
    if not gpu_model:
        return None
    if gpu_model in GPU_GIB:
        return GPU_GIB[gpu_model]
    sized = re.search(r"(\d+)gb$", gpu_model)
    return float(sized.group(1)) if sized else None


def kv_slots(cfg: OmniConfig) -> tuple[int, int]:
    """(sequences, tokens each) the engine allocates its KV cache for: serving.batching's slots and
    context (null: the model's window), as model.nn.kv_cache sizes it."""
    batching = cfg.serving.batching
    return batching.max_batch_size, batching.max_context or cfg.model.llm.max_position_embeddings


def serving_bytes(cfg: OmniConfig, dtype_bytes: int) -> tuple[float, float]:
    """(weights, KV cache of a full batch) in bytes, for the configured model."""
    from model.nn.plan import parameter_counts

    llm = cfg.model.llm
    weights = sum(parameter_counts(cfg.model).values()) * dtype_bytes
    kv_width = llm.hidden_size // llm.num_attention_heads * llm.num_key_value_heads
    per_token = 2 * llm.num_hidden_layers * kv_width * dtype_bytes
    batch, context = kv_slots(cfg)
    return weights, per_token * batch * context


def endpoint_fit(cfg: OmniConfig) -> list[str]:
    """Warnings, one line each, for every way the endpoint's resources cannot hold the model."""
    from kubernetes.utils.quantity import parse_quantity

    endpoint, pool = cfg.cluster.endpoint, cfg.cluster.gpu_pool
    warnings = []
    dtype_bytes = 2 if endpoint.gpu else 4
    weights, kv = serving_bytes(cfg, dtype_bytes)
    need = weights + kv + (CUDA_OVERHEAD if endpoint.gpu else 0)
    batch, context = kv_slots(cfg)
    what = (f"model {cfg.model.name!r} needs {need / GIB:.1f} GiB to serve ({weights / GIB:.1f} GiB of weights in "
            f"{'bf16' if endpoint.gpu else 'fp32'} + {kv / GIB:.1f} GiB KV cache for {batch} x {context} tokens)")
    per_gpu = gpu_gib(pool.node_pool.gpu_model)
    if endpoint.gpu and per_gpu is not None and need > 0.9 * per_gpu * GIB * endpoint.gpu:
        warnings.append(f"{what}, but cluster.endpoint.gpu={endpoint.gpu} x {pool.node_pool.gpu_model} has "
                        f"{per_gpu * endpoint.gpu:g} GiB: raise cluster.endpoint.gpu or use a larger GPU")
    host = float(parse_quantity(endpoint.memory))
    host_need = weights + (0 if endpoint.gpu else kv) + 2 * GIB  # the weights pass through host memory as they load
    if host < host_need:
        warnings.append(f"{what}; the predictor's host memory cluster.endpoint.memory={endpoint.memory} is under the "
                        f"{host_need / GIB:.1f} GiB it needs while loading: raise cluster.endpoint.memory")
    return warnings
