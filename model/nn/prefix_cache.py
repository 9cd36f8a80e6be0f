"""Prompt prefix reuse for the serving engine: a finished sequence's KV-cache slot keeps its keys and
values until the slot is needed, and a newcomer whose prompt starts the same way takes them over
instead of computing them again (what vLLM calls automatic prefix caching).

A chat API is stateless: every turn of a conversation resends the whole history, images included,
and many requests share a system prompt. With the cache, turn two prefills only what turn one did
not hold, and its media skip the encoders when every placeholder falls inside the reused prefix.

What a column holds is named by its key: the token id, except at media placeholders, whose id is
the same for every image. There the key is a digest of all of that kind's inputs in the prompt (its
tiles, frames or audio windows, bytes and shapes): two prompts share a placeholder's column only if
they carry the same media of its kind. (Digesting a kind's items together, not one by one, is
coarser than needed, a conversation that adds an image in turn two reuses turn one only up to its
first image, and it is always safe: a placeholder's features depend on its own item alone.)

The entries live in slots the engine counts as free: no extra memory. `PrefixCache.pick_slot`
chooses where a newcomer goes: the entry it matched (taken over, no copy) when it reuses all it can
of it and no lower slot is empty, else the lowest empty slot (the prefix copied in), else the least
recently used entry.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from model.nn.encoders import ENCODERS
from model.text.processor import Encoded

MIN_REUSE = 1  # columns worth copying: any reuse skips at least that much of the LLM's prefill


def prompt_key(encoded: Encoded, placeholder_ids: dict[str, int]) -> np.ndarray:
    """One int64 per prompt token naming what its KV column holds (see the module doc). Media digests
    are negative, so they never equal a token id."""
    key = np.asarray(encoded.input_ids, dtype=np.int64)
    for kind, placeholder in placeholder_ids.items():
        at = key == placeholder
        if at.any():
            key[at] = _media_digest(kind, getattr(encoded, ENCODERS[kind].inputs[0]))
    return key


def _media_digest(kind: str, items: list[torch.Tensor]) -> int:
    h = hashlib.blake2b(kind.encode(), digest_size=8)
    for t in items:
        t = t.detach().cpu().contiguous()
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return -(int.from_bytes(h.digest(), "little") >> 1) - 1


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass
class Entry:
    key: np.ndarray  # one per column of the slot that holds keys and values
    used: float


@dataclass
class Match:
    slot: int
    tokens: int  # leading columns of `slot` the newcomer can take


class PrefixCache:
    """Finished sequences' columns, by slot (the slots are free in the engine's `SlotCache`)."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def keep(self, slot: int, key: np.ndarray) -> None:
        """`slot`'s first len(key) columns hold what `key` names. An older entry that this one contains
        adds nothing and is dropped (one client asking the same question again leaves one copy)."""
        if len(key) < MIN_REUSE:
            self.entries.pop(slot, None)
            return
        for other, entry in list(self.entries.items()):
            if len(entry.key) <= len(key) and common_prefix(entry.key, key) == len(entry.key):
                del self.entries[other]
        self.entries[slot] = Entry(key, time.monotonic())

    def drop(self, slot: int) -> None:
        self.entries.pop(slot, None)

    def longest(self, key: np.ndarray, limit: int) -> Match | None:
        """The entry sharing the longest prefix with `key`, at most `limit` columns of it."""
        best: Match | None = None
        for slot, entry in self.entries.items():
            n = min(common_prefix(entry.key, key), limit)
            if n >= MIN_REUSE and (best is None or n > best.tokens):
                best = Match(slot, n)
        if best is not None:
            self.entries[best.slot].used = time.monotonic()
        return best

    def pick_slot(self, free: list[int], match: Match | None, wanted: int) -> int:
        """Where a newcomer that could reuse up to `wanted` columns goes, from the engine's free slots.
        Low slots first: decode runs over slots[:highest used + 1]. Its match, taken over (no copy), if
        the newcomer takes all it can of it (a repeated question, a chat's next turn: the slot will
        hold as much again when it ends) and no lower slot is empty; else the lowest empty slot (the
        match stays for others asking alike); else the least recently used entry. The chosen slot's
        entry is dropped."""
        empty = [s for s in free if s not in self.entries]
        whole = match is not None and match.tokens >= min(len(self.entries[match.slot].key), wanted)
        if whole and (not empty or match.slot < min(empty)):
            slot = match.slot
        elif empty:
            return min(empty)
        else:
            slot = min(free, key=lambda s: self.entries[s].used)
        self.drop(slot)
        return slot
