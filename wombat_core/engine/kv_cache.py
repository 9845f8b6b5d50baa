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
that reallocation is the one whole-cache copy, and it happens a logarithmic number of times. Growth is
all-or-nothing: every layer's new storage is allocated before any replaces the old, so a failed
allocation (KVCacheFull) leaves the cache as it was and the rows in it running. On CUDA the runner
allocates the full capacity at start instead (`initial_capacity`), sized against the memory budget, so
an out-of-memory shows at start, not under live traffic.

A row's columns are bounded by the capacity, but its left padding is not part of its context: a row
about to write past the last column is shifted left by its padding (`unpad_row`), so every request can
reach the model's full context whatever group it was prefilled in.

A forward's rows write as a plan says (`CacheWrite`: which rows, which columns, how many columns they
attend over; `prepare_decode` and `prepare_prefill` make them). `write()` puts the new keys and values
there and returns views [rows, kv_heads, columns, head_dim] of the storage (no copy); the lean forward
calls it with each segment's plan, and the model's own attention reaches it through `update()`
(transformers' Cache interface) after the runner set the plan with `plan()`. Which of those columns
each row may see is the attention mask's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from wombat_core.errors import FailedPrecondition, ResourceExhausted

INITIAL_CAPACITY = 256


class KVCacheFull(ResourceExhausted):
    """The KV cache could not grow: no memory for the columns a new group needs."""

    reason = "KV_CACHE_FULL"


def check_preallocation(*, slots: int, context: int, bytes_per_column: int, total_bytes: int, in_use_bytes: int,
                        reserve_bytes: int, utilization: float) -> None:  # fmt: skip
    """Refuses, at start, a cache of `slots` rows of `context` columns that does not fit the device's budget:
    `utilization` of its memory, less what is in use (the weights, other processes) and `reserve_bytes` for
    activations. The message names both figures and a configuration that fits (as vLLM does at start)."""
    budget = int(total_bytes * utilization) - in_use_bytes - reserve_bytes
    need = slots * context * bytes_per_column
    if need <= budget:
        return
    gib = 2**30
    fitting_slots = max(0, budget) // (context * bytes_per_column)
    fitting_context = max(0, budget) // (slots * bytes_per_column)
    raise FailedPrecondition(
        f"the KV cache for {slots} slots x {context} tokens needs {need / gib:.2f} GiB, but only "
        f"{max(0, budget) / gib:.2f} GiB remain within --gpu-memory-utilization {utilization} of "
        f"{total_bytes / gib:.1f} GiB ({in_use_bytes / gib:.2f} GiB already in use, {reserve_bytes / gib:.2f} GiB "
        f"kept for activations); set --max-batch-size {fitting_slots} or --max-model-len {fitting_context}, "
        "or raise --gpu-memory-utilization"
    )


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
class CacheWrite:
    """Where a forward's batch rows write, and what they attend over (one per segment of a forward)."""

    rows: slice  # the slots this forward's batch rows are
    columns: torch.Tensor | slice  # decode: [rows] one column per row; prefill: the same columns for all
    attend: int  # columns the returned views cover, [0, attend)
    row_index: torch.Tensor | None = None  # decode: the rows as an index tensor, made once for all layers


class KVCache(Cache):
    def __init__(self, *, layers: int, slots: int, kv_heads: int, head_dim: int, max_capacity: int,
                 dtype: torch.dtype, device: torch.device, initial_capacity: int = INITIAL_CAPACITY):  # fmt: skip
        # transformers' Cache API without its per-layer objects: hybrid-model helpers read `layers`.
        self.layers: list = []
        self.slots, self.max_capacity = slots, max_capacity
        self.capacity = min(initial_capacity, max_capacity)
        shape = (slots, kv_heads, self.capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._write: CacheWrite | None = None

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
        try:  # all layers' new storage first: a failure leaves the cache as it was
            keys = [self._grown(old, capacity) for old in self.keys]
            values = [self._grown(old, capacity) for old in self.values]
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # CUDA's OOM, or the CPU allocator's
            need = self.slots * capacity * self.bytes_per_column()
            raise KVCacheFull(
                f"the KV cache could not grow from {self.capacity} to {capacity} columns per row "
                f"({need / 2**30:.2f} GiB): out of memory; retry later, or ask for fewer max_new_tokens"
            ) from exc
        self.keys, self.values, self.capacity = keys, values, capacity

    def _grown(self, old: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
        grown[:, :, : self.capacity] = old
        return grown

    def prepare_prefill(self, rows: slice, start: int, end: int) -> CacheWrite:
        """The plan of a prefill chunk: rows `rows`, columns [start, end) written for every row."""
        self.ensure_capacity(end)
        return CacheWrite(rows, slice(start, end), end)

    def prepare_decode(self, rows: int, columns: torch.Tensor, attend: int) -> CacheWrite:
        """The plan of a decode step of rows [0, rows): each writes one column, `columns[row]`."""
        self.ensure_capacity(attend)
        return CacheWrite(slice(0, rows), columns, attend, torch.arange(rows, device=columns.device))

    def plan(self, write: CacheWrite) -> None:
        """The next forward through `update()` (the model's own attention) writes as `write` says."""
        self._write = write

    def move_rows(self, moves: list[tuple[int, int]], columns: int) -> None:
        """Copies each source row's first `columns` columns onto its destination row (in order, so a chain
        of moves into rows that were themselves moved out earlier is safe)."""
        for store in (self.keys, self.values):
            for layer in store:
                for destination, source in moves:
                    layer[destination, :, :columns] = layer[source, :, :columns]

    def unpad_row(self, row: int, offset: int, end: int) -> None:
        """Moves `row`'s columns [offset, end) to [0, end - offset): drops its left padding in place."""
        for store in (self.keys, self.values):
            for layer in store:
                layer[row, :, : end - offset] = layer[row, :, offset:end].clone()  # overlapping ranges

    def bytes_per_column(self) -> int:
        """Bytes one column of one row takes over every layer, keys and values."""
        one = self.keys[0]
        return 2 * len(self.keys) * one.shape[1] * one.shape[3] * one.element_size()

    # --- what the model's attention layers call ---------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [batch rows, kv_heads, new columns, head_dim]. Returns the views the
        layer attends over: [batch rows, kv_heads, attend, head_dim]."""
        assert self._write is not None, "the runner prepares every forward"
        return self.write(layer_idx, key_states, value_states, self._write)

    def write(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, write: CacheWrite):
        """`update` with the plan given: the lean forward (cpu_forward.py) runs segments with a plan each."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if isinstance(write.columns, slice):
            keys[write.rows, :, write.columns] = key_states
            values[write.rows, :, write.columns] = value_states
        else:
            keys[write.row_index, :, write.columns] = key_states[:, :, 0]
            values[write.row_index, :, write.columns] = value_states[:, :, 0]
        return self.attended(layer_idx, write)

    def attended(self, layer_idx: int, write: CacheWrite) -> tuple[torch.Tensor, torch.Tensor]:
        """The views [rows, kv_heads, attend, head_dim] a plan's rows attend over (no copy)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        return keys[write.rows, :, : write.attend], values[write.rows, :, : write.attend]

    def token_places(self, write: CacheWrite, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot and the column of each token a plan writes, in a forward's token order (row by row, `length`
        tokens a row): for a writer that fills the storage itself (cpu_fused.rotary_write)."""
        if isinstance(write.columns, slice):
            device, rows = self.keys[0].device, write.rows.stop - write.rows.start
            slots = torch.arange(write.rows.start, write.rows.stop, device=device).repeat_interleave(length)
            return slots, torch.arange(write.columns.start, write.columns.stop, device=device).repeat(rows)
        assert write.row_index is not None
        return write.row_index + write.rows.start, write.columns

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._write.attend if self._write is not None else 0
