"""The KV cache: preallocated per-slot storage that every sequence of the engine lives in (after vLLM's
KVCacheManager; one class owns the layout, the runner asks it for rows and never reshapes tensors).

Layout, per layer:

    keys[layer], values[layer]: [slots, kv_heads, capacity, head_dim]

A sequence owns one slot (a row). Its tokens occupy columns [offset, length) of that row: the columns
before `offset` are the left padding of the prefill group it was prefilled in, so a group's rows end on
the same column and one logits position serves them all. A row's rotary position is its column minus
its offset. The running rows occupy slots [0, n); a prefill group is built in the top slots [S - g, S)
and moved down next to the running rows when its prompts are complete; a row that leaves is replaced by
the last running row. So joining or leaving copies that row only, never the batch, and decode writes
each row's new key and value into its own column in place: nothing is concatenated per step.

Capacity (columns per row) starts small and doubles when a row needs more, up to the model's context;
that reallocation is the one whole-cache copy, and it happens a logarithmic number of times.

The model's own attention reads the cache through `update()` (transformers' Cache interface): before
each forward the runner says which rows and columns that forward writes and how many columns it attends
over, and `update()` writes the new keys and values there and returns views [rows, kv_heads, columns,
head_dim] of the storage (no copy). Which of those columns each row may see is the attention mask's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

INITIAL_CAPACITY = 256


def compaction_moves(rows: int, leaving: list[int]) -> list[tuple[int, int]]:
    """How to keep rows [0, rows) contiguous when `leaving` rows go: (destination, source) pairs that move
    the surviving rows of the tail into the holes the leaving rows open. Every owner of per-row state (the
    cache, the sampler, the engine's list of sequences) applies the same moves."""
    gone = set(leaving)
    remaining = rows - len(gone)
    holes = sorted(r for r in gone if r < remaining)
    survivors = [r for r in range(remaining, rows) if r not in gone]
    return list(zip(holes, survivors, strict=True))


@dataclass
class _Write:
    """Where the current forward writes, and what it attends over."""

    rows: slice  # the slots this forward's batch rows are
    columns: torch.Tensor | slice  # decode: [rows] one column per row; prefill: the same columns for all
    attend: int  # columns the returned views cover, [0, attend)


class KVCache(Cache):
    def __init__(self, *, layers: int, slots: int, kv_heads: int, head_dim: int, max_capacity: int,
                 dtype: torch.dtype, device: torch.device):  # fmt: skip
        # transformers' Cache API without its per-layer objects: hybrid-model helpers read `layers`.
        self.layers: list = []
        self.slots, self.max_capacity = slots, max_capacity
        self.capacity = min(INITIAL_CAPACITY, max_capacity)
        shape = (slots, kv_heads, self.capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._write: _Write | None = None

    # --- what the runner calls -------------------------------------------------------------------------

    def ensure_capacity(self, columns: int) -> None:
        """Makes room for `columns` columns per row (doubling; the only whole-cache copy)."""
        if columns <= self.capacity:
            return
        if columns > self.max_capacity:
            raise ValueError(f"{columns} columns exceed the cache's maximum of {self.max_capacity}")
        capacity = self.capacity
        while capacity < columns:
            capacity *= 2
        capacity = min(capacity, self.max_capacity)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                grown = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
                grown[:, :, : self.capacity] = old
                store[layer] = grown
        self.capacity = capacity

    def prepare_prefill(self, rows: slice, start: int, end: int) -> None:
        """The next forward is a prefill chunk: rows `rows`, columns [start, end) written for every row."""
        self.ensure_capacity(end)
        self._write = _Write(rows, slice(start, end), end)

    def prepare_decode(self, rows: int, columns: torch.Tensor, attend: int) -> None:
        """The next forward is a decode step of rows [0, rows): each writes one column, `columns[row]`."""
        self.ensure_capacity(attend)
        self._write = _Write(slice(0, rows), columns, attend)

    def move_rows(self, moves: list[tuple[int, int]], columns: int) -> None:
        """Copies each source row's first `columns` columns onto its destination row (in order, so a chain
        of moves into rows that were themselves moved out earlier is safe)."""
        for store in (self.keys, self.values):
            for layer in store:
                for destination, source in moves:
                    layer[destination, :, :columns] = layer[source, :, :columns]

    def bytes_per_column(self) -> int:
        """Bytes one column of one row takes over every layer, keys and values."""
        one = self.keys[0]
        return 2 * len(self.keys) * one.shape[1] * one.shape[3] * one.element_size()

    # --- what the model's attention layers call ---------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [batch rows, kv_heads, new columns, head_dim]. Returns the views the
        layer attends over: [batch rows, kv_heads, attend, head_dim]."""
        write = self._write
        assert write is not None, "the runner prepares every forward"
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if isinstance(write.columns, slice):
            keys[write.rows, :, write.columns] = key_states
            values[write.rows, :, write.columns] = value_states
        else:
            rows = torch.arange(write.rows.start, write.rows.stop, device=keys.device)
            keys[rows, :, write.columns] = key_states[:, :, 0]
            values[rows, :, write.columns] = value_states[:, :, 0]
        return keys[write.rows, :, : write.attend], values[write.rows, :, : write.attend]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._write.attend if self._write is not None else 0
