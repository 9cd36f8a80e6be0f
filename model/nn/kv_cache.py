"""The serving engine's KV cache: one slot per running sequence, allocated once.

Every layer holds keys and values of shape (slots, kv_heads, capacity + 1, head_dim). A sequence owns
one slot from admission to its end and is stored left-aligned in it, so a token's column is its
position: admitting a sequence writes only its own slot (the running batch's cache is never copied
or re-padded), and leaving frees the slot for the next one. The extra last column takes the writes
of padding positions (the unused rows of a decode bucket, the short rows of a prefill chunk), so
every forward writes with one indexed store and no branch on the host.

The LLM's attention layers call `update` (transformers' cache protocol) with the new keys and
values; the engine says beforehand which slots the forward's rows are (`rows`), at which columns
they write (`cols`), and how many columns the attention reads (`width`).
"""

from __future__ import annotations

import torch


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes the keys and values of one token take over every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def plan_slots(config, dtype: torch.dtype, device: torch.device, max_batch: int, context: int,
               memory_fraction: float = 0.9) -> tuple[int, int]:
    """(slots, capacity) for `max_batch` sequences of up to `context` tokens. On a GPU, bounded by
    `memory_fraction` of the free memory: first fewer slots, then (one slot left) fewer columns."""
    per_token = kv_bytes_per_token(config, dtype)
    if device.type != "cuda":
        return max_batch, context
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(free * memory_fraction)
    slots = min(max_batch, budget // (per_token * (context + 1)))
    if slots >= 1:
        return slots, context
    capacity = budget // per_token - 1
    if capacity < 1:
        raise torch.OutOfMemoryError(f"no GPU memory left for a KV cache ({free / 2**30:.2f} GiB free)")
    return 1, capacity


class SlotCache:
    """Keys and values of up to `slots` sequences of up to `capacity` tokens each (see the module doc)."""

    def __init__(self, config, slots: int, capacity: int, device: torch.device, dtype: torch.dtype):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, config.num_key_value_heads, capacity + 1, head_dim)
        # Zeros, not empty: a masked column still meets its value in the attention's matmul (0 x NaN = NaN).
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.slots, self.capacity, self.device, self.dtype = slots, capacity, device, dtype
        self.free = list(range(slots))
        self.rows: torch.Tensor | slice = slice(0, 0)  # the forward's rows: slots[:n] (decode) or an index (prefill)
        self.cols = torch.zeros(0, 1, dtype=torch.long, device=device)  # (rows, tokens) column written per token
        self.index = self.cols
        self.width = 0  # columns the attention reads

    @property
    def trash(self) -> int:
        """The column that takes padding positions' writes; never read."""
        return self.capacity

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def allocate(self) -> int | None:
        """The lowest free slot (decode runs over slots[:highest used + 1]), or None when all are taken."""
        if not self.free:
            return None
        self.free.sort()
        return self.free.pop(0)

    def take(self, slot: int) -> int:
        """Allocate this free slot (the prefix cache chooses which)."""
        self.free.remove(slot)
        return slot

    def copy_prefix(self, source: int, target: int, columns: int) -> None:
        """Copy the first `columns` keys and values of slot `source` into slot `target`, in every layer."""
        for cache in (*self.keys, *self.values):
            cache[target, :, :columns] = cache[source, :, :columns]

    def release(self, slot: int) -> None:
        if slot not in self.free:
            self.free.append(slot)

    @property
    def used(self) -> int:
        return self.slots - len(self.free)

    def set_forward(self, rows: torch.Tensor | slice, cols: torch.Tensor, width: int) -> None:
        """The next forward's rows (slots[:n] as a slice, or slot numbers), its (rows, tokens) columns to
        write, and the columns to attend."""
        self.rows, self.cols, self.width = rows, cols, width
        if isinstance(rows, slice):
            self.index = torch.arange(rows.stop, device=self.device)[:, None]
        else:
            self.index = rows[:, None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' cache protocol: store the (rows, heads, tokens, dim) new keys and values at
        `cols`, and return the rows' first `width` columns for the attention."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.index, :, self.cols] = key_states.transpose(1, 2).to(keys.dtype)
        values[self.index, :, self.cols] = value_states.transpose(1, 2).to(values.dtype)
        # slots[:n] is a view (decode reads in place); a prefill's slot numbers gather its rows.
        return keys[self.rows, :, : self.width], values[self.rows, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width
