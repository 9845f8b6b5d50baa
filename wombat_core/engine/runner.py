"""Model execution for continuous batching: chunked prefill of newcomers and batched decode steps.

The running batch shares one key/value cache whose columns are aligned on the right: every row is
left-padded (mask 0) up to the batch's common length, exactly the layout Hugging Face uses for batched
generation, so the model's own attention and positional code apply unchanged. Newcomers are prefilled
as a separate group (chunk by chunk, so a long prompt never stalls running streams for long), then
merged by left-padding whichever side is shorter. Finished rows are dropped at once, and columns that
became padding in every row are cut off.

    cache keys/values per layer: [rows, kv_heads, columns, head_dim]
    mask:                        [rows, columns]   1 = real token, 0 = padding
    positions:                   [rows]            position id of each row's next token
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@dataclass
class KVBatch:
    """A set of rows sharing one cache (the running batch, or a prefill group once it is complete)."""

    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor
    last_tokens: torch.Tensor  # [rows] the token each row feeds into its next decode step

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def columns(self) -> int:
        return self.mask.shape[1]


def _layers(cache: DynamicCache):
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]


def _left_pad(batch: KVBatch, columns: int) -> None:
    extra = columns - batch.columns
    if extra <= 0:
        return
    for layer in _layers(batch.cache):
        layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
        layer.values = F.pad(layer.values, (0, 0, extra, 0))
    batch.mask = F.pad(batch.mask, (extra, 0))


def merge(running: KVBatch | None, newcomers: KVBatch) -> KVBatch:
    """Appends `newcomers` rows to `running` (which may be None), left-padding the shorter side."""
    if running is None or running.rows == 0:
        return newcomers
    columns = max(running.columns, newcomers.columns)
    _left_pad(running, columns)
    _left_pad(newcomers, columns)
    for ours, theirs in zip(_layers(running.cache), _layers(newcomers.cache), strict=True):
        ours.keys = torch.cat([ours.keys, theirs.keys])
        ours.values = torch.cat([ours.values, theirs.values])
    running.mask = torch.cat([running.mask, newcomers.mask])
    running.positions = torch.cat([running.positions, newcomers.positions])
    running.last_tokens = torch.cat([running.last_tokens, newcomers.last_tokens])
    return running


def keep_rows(batch: KVBatch, keep: list[int]) -> KVBatch | None:
    """Drops every row not in `keep`, then the leading columns that are padding in all remaining rows."""
    if not keep:
        return None
    if len(keep) == batch.rows:
        return batch
    index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    batch.mask = batch.mask.index_select(0, index)
    first_real = int(batch.mask.any(0).to(torch.int8).argmax())
    for layer in _layers(batch.cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, first_real:]
        layer.values = layer.values.index_select(0, index)[:, :, first_real:]
    batch.mask = batch.mask[:, first_real:]
    batch.positions = batch.positions.index_select(0, index)
    batch.last_tokens = batch.last_tokens.index_select(0, index)
    return batch


class PrefillGroup:
    """Newcomers prefilled together: prompts left-padded to a common length and processed in chunks."""

    def __init__(self, prompts: list[tuple[int, ...]], pad_token_id: int, device: torch.device):
        length = max(len(p) for p in prompts)
        self.input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long, device=device)
        self.mask = torch.zeros((len(prompts), length), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            self.input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            self.mask[row, length - len(prompt) :] = 1
        self.position_ids = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        self.done = 0  # columns already prefilled

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def finished(self) -> bool:
        return self.done >= self.length

    def drop_rows(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.input_ids = self.input_ids.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.position_ids = self.position_ids.index_select(0, index)
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pad_token_id: int):
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device

    def new_group(self, prompts: list[tuple[int, ...]]) -> PrefillGroup:
        return PrefillGroup(prompts, self.pad_token_id, self.device)

    @torch.inference_mode()
    def prefill_chunk(self, group: PrefillGroup, max_tokens: int) -> torch.Tensor | None:
        """Runs the next chunk (at most `max_tokens` tokens over all rows). When the prompts are complete,
        returns the float32 logits of each row's last position, [rows, vocab]; otherwise None."""
        columns = max(1, max_tokens // group.rows)
        end = min(group.length, group.done + columns)
        output = self.model(
            input_ids=group.input_ids[:, group.done : end],
            attention_mask=group.mask[:, :end],
            position_ids=group.position_ids[:, group.done : end],
            past_key_values=group.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        group.done = end
        if not group.finished:
            return None
        return output.logits[:, -1, :].float()

    def complete_group(self, group: PrefillGroup, first_tokens: torch.Tensor) -> KVBatch:
        return KVBatch(
            cache=group.cache,
            mask=group.mask,
            positions=group.position_ids[:, -1] + 1,
            last_tokens=first_tokens,
        )

    @torch.inference_mode()
    def decode(self, batch: KVBatch) -> torch.Tensor:
        """One step for every row: feeds each row's last token, returns float32 logits [rows, vocab]."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.rows, 1))], dim=1)
        output = self.model(
            input_ids=batch.last_tokens[:, None],
            attention_mask=batch.mask,
            position_ids=batch.positions[:, None],
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.positions = batch.positions + 1
        return output.logits[:, -1, :].float()
