"""Prompt prefix reuse for the serving engine: a finished sequence's KV-cache slot keeps its keys and
values until the slot is needed, and a newcomer whose prompt starts the same way takes them over
instead of computing them again (what vLLM calls automatic prefix caching).

A chat API is stateless: every turn of a conversation resends the whole history, images included,
and many requests share a system prompt. With the cache, turn two prefills only what turn one did
not hold, and its media skip the encoders when every placeholder falls inside the reused prefix.

What a column holds is named by its key: the token id, except at media placeholders, whose id is
the same for every image. There the key is a digest of the item the placeholder's features come
from (its tile, frame or audio window) and of every item of that kind before it in the prompt, so two
prompts share a placeholder's column only if they carry the same media up to it. A conversation that
adds an image, or a voice session adding a turn's audio, still reuses every earlier turn. (Each
item's features depend on that item alone: per tile, per frame, per window, `model.nn.encoders`; were
they to depend on the items before it as well, the chain covers that too. Where the placeholders do
not add up to the items' token counts, every placeholder of the kind gets the digest of all of them.)

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
from model.text.processor import Encoded, OmniProcessor

MIN_REUSE = 1  # columns worth copying: any reuse skips at least that much of the LLM's prefill


def prompt_key(encoded: Encoded, processor: OmniProcessor) -> np.ndarray:
    """One int64 per prompt token naming what its KV column holds (see the module doc). Media digests
    are negative, so they never equal a token id."""
    key = np.asarray(encoded.input_ids, dtype=np.int64)
    for kind, placeholder in processor.placeholder_ids.items():
        at = np.flatnonzero(key == placeholder)
        if len(at):
            key[at] = _media_keys(kind, getattr(encoded, ENCODERS[kind].inputs[0]), processor, len(at))
    return key


def _item_tokens(kind: str, item: torch.Tensor, processor: OmniProcessor) -> int:
    """Placeholders one item fills: as the processor counts them (and the encoders produce them)."""
    if kind == "audio":
        return processor.audio_tokens([item])
    return processor.tile_tokens if kind == "image" else processor.frame_tokens


def _media_keys(kind: str, items: list[torch.Tensor], processor: OmniProcessor, placeholders: int) -> np.ndarray:
    """The key of each of a kind's placeholders, in order: the digest of its item and those before."""
    counts = [_item_tokens(kind, item, processor) for item in items]
    chain = hashlib.blake2b(kind.encode(), digest_size=8)
    if sum(counts) != placeholders:  # not as expected: one digest of all the items, coarser and still safe
        for item in items:
            _absorb(chain, item)
        return np.full(placeholders, _negative(chain.digest()), dtype=np.int64)
    keys = []
    for item, n in zip(items, counts, strict=True):
        _absorb(chain, item)
        keys += [_negative(chain.digest())] * n
    return np.asarray(keys, dtype=np.int64)


def _absorb(chain: hashlib.blake2b, item: torch.Tensor) -> None:
    t = item.detach().cpu().contiguous()
    chain.update(repr((tuple(t.shape), str(t.dtype))).encode())
    chain.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy())  # its buffer, not a copy


def _negative(digest: bytes) -> int:
    return -(int.from_bytes(digest, "little") >> 1) - 1


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
