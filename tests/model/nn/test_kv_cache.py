"""Sizing the engine's KV cache from GPU memory (CI has no GPU: the free-memory query is stubbed)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config

from model.nn.kv_cache import SlotCache, kv_bytes_per_token, plan_slots

CONFIG = Qwen2Config(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)
CUDA = torch.device("cuda")


def test_bytes_per_token_counts_keys_and_values_of_every_layer():
    assert kv_bytes_per_token(CONFIG, torch.bfloat16) == 2 * 28 * 2 * 128 * 2  # Qwen2-1.5B: 28 KiB


@pytest.mark.parametrize("free_gib, want", [
    (100, (64, 4096)),  # room for all: max_batch x context
    (1, (8, 4096)),  # fewer slots, full context each
    (0.05, (1, 1684)),  # not one full slot: one shorter slot
])
def test_slots_fit_the_free_memory(monkeypatch, free_gib, want):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 80 * 2**30))
    slots, capacity = plan_slots(CONFIG, torch.bfloat16, CUDA, max_batch=64, context=4096)
    assert (slots, capacity) == want
    assert slots * (capacity + 1) * kv_bytes_per_token(CONFIG, torch.bfloat16) <= 0.9 * free_gib * 2**30


def test_no_memory_at_all_is_an_out_of_memory_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 80 * 2**30))
    with pytest.raises(torch.OutOfMemoryError, match="no GPU memory left"):
        plan_slots(CONFIG, torch.bfloat16, CUDA, max_batch=8, context=4096)


def test_slots_are_taken_lowest_first_and_given_back():
    cache = SlotCache(Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
                      slots=3, capacity=8, device=torch.device("cpu"), dtype=torch.float32)
    assert [cache.allocate() for _ in range(3)] == [0, 1, 2] and cache.allocate() is None
    cache.release(1)
    cache.release(0)
    assert cache.allocate() == 0 and cache.used == 2
    assert cache.keys[0].shape == (3, 1, 9, 16)  # capacity + the trash column
