"""`omni cluster render` warns when the endpoint's hardware cannot hold the model it serves."""

from __future__ import annotations

from components.cluster.capacity import endpoint_fit, gpu_gib
from components.config import load_config


def test_the_shipped_settings_fit_both_model_sizes():
    assert endpoint_fit(load_config()) == []
    assert endpoint_fit(load_config(["model=omni-7b"])) == []  # 1 x H100 80 GB, 32Gi of host memory


def test_a_gpu_too_small_and_a_cpu_endpoint_are_named_with_the_setting_to_change():
    small_gpu = endpoint_fit(load_config(["model=omni-7b", "cluster.gpu_pool.node_pool.gpu_model=nvidia-l4"]))
    assert len(small_gpu) == 1 and "cluster.endpoint.gpu=1 x nvidia-l4 has 24 GiB" in small_gpu[0]
    cpu_only = endpoint_fit(load_config(["model=omni-7b", "cluster.endpoint.gpu=0"]))
    assert len(cpu_only) == 1 and "fp32" in cpu_only[0] and "raise cluster.endpoint.memory" in cpu_only[0]


def test_gpu_memory_from_the_accelerator_type():
    assert gpu_gib("nvidia-h100-80gb") == 80 and gpu_gib("nvidia-l4") == 24 and gpu_gib("nvidia-b200-180gb") == 180
    assert gpu_gib("something-else") is None and gpu_gib(None) is None


def test_render_prints_the_warning(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["cluster", "render", "--out", str(tmp_path), "model=omni-7b", "cluster.endpoint.gpu=0"]) == 0
    assert "omni: warning: model 'omni-7b' needs" in capsys.readouterr().err


def test_the_kv_cache_is_sized_as_the_engine_allocates_it():
    """serving.batching's slots x context (the engine's SlotCache), not the v2 request's row limit."""
    small = ["model=omni-7b", "cluster.gpu_pool.node_pool.gpu_model=some-gpu-16gb"]  # under the weights alone
    base = endpoint_fit(load_config(small))[0]
    wide = endpoint_fit(load_config([*small, "serving.batching.max_batch_size=64",
                                     "cluster.endpoint.container_concurrency=64"]))[0]
    short = endpoint_fit(load_config([*small, "serving.batching.max_context=4096"]))[0]
    assert "KV cache for 8 x" in base and "KV cache for 64 x" in wide and "KV cache for 8 x 4096 tokens" in short
