"""Model execution for continuous batching: chunked prefill of newcomer groups and batched decode steps
on the rows of the KV cache (kv_cache.py owns the layout; this module never reshapes it).

A step (`step`) is a decode step of the running rows and a prefill chunk of the group in flight, each a
`Segment` with per-row positions, a per-row mask over the cache's columns and its cache plan:

    decode:  input_ids [rows, 1], position_ids [rows, 1], mask [rows, 1, 1, columns]
    prefill: input_ids [group, chunk], position_ids [group, chunk], mask [group, 1, chunk, columns]

A CPU model whose kernels cpu_kernels swapped runs both segments as one forward of the lean decoder
(cpu_forward.py); any other model runs its own forward and SDPA attention, a segment at a time.

A mask entry is True where the query may attend: the row's own columns from its offset (left padding
excluded) up to the query's column. A prefill query at a padding column attends only to itself, so that
no row of the attention is empty (an empty row would make a NaN the masked columns then carry along).

Every tensor the runner makes is created on the model's device, and the tokens a decode step feeds are
the sampler's output already on that device: the host sees only what the engine transfers. Everything
that writes the cache runs in inference mode, so a cache tensor reallocated there stays writable.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from wombat_core.engine.cpu_forward import LeanLlamaForward, Segment, SegmentLogits
from wombat_core.engine.cpu_kernels import swapped
from wombat_core.engine.kv_cache import INITIAL_CAPACITY, KVCache, check_preallocation


@dataclass
class PrefillGroup:
    """Newcomers prefilled together in the cache's top slots, prompts left-padded to a common length.

    input_ids, position_ids: [rows, length]
    real:                    [rows, length]  True at prompt tokens, False at left padding
    """

    first_slot: int
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    real: torch.Tensor
    offsets: list[int]  # left padding of each row
    done: int = 0  # columns already prefilled
    # Prompt logprobs: the rows (indices in the group) that asked, the most alternatives one asked for, and
    # each prefilled chunk's scores, kept on the device until the group is complete.
    score_rows: list[int] = field(default_factory=list)
    score_index: torch.Tensor | None = None  # score_rows on the device, made once for every chunk
    score_top: int = 0
    scored: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def finished(self) -> bool:
        return self.done >= self.length


@dataclass
class PromptScores:
    """Prompt logprobs of a completed group, still on the device: for each scoring row, the column t of
    `packed` holds the prompt token at column t + 1, its logprob given columns <= t, then `top` best
    logprobs and their ids. Columns before a row's offset (its left padding) mean nothing."""

    rows: list[int]  # indices in the group
    top: int
    packed: torch.Tensor  # [len(rows), length - 1, 2 + 2 * top] float64


@dataclass
class StepLogits:
    decode: torch.Tensor | None  # [running rows, vocab]
    prefill: torch.Tensor | None  # [group rows, vocab], once the group's prompts are complete
    prompt: PromptScores | None = None  # with `prefill`, when some newcomer asked for prompt logprobs


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pad_token_id: int, slots: int, context_length: int, *,
                 memory_utilization: float = 0.9, max_prefill_tokens: int = 512):  # fmt: skip
        self.model, self.pad_token_id, self.slots = model, pad_token_id, slots
        parameter = next(model.parameters())
        self.device = parameter.device
        config = model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        initial = INITIAL_CAPACITY
        if self.device.type == "cuda":  # the whole cache now, within the budget: no OOM under live traffic
            free, total = torch.cuda.mem_get_info(self.device)
            itemsize = parameter.element_size()
            activations = (
                max_prefill_tokens * (2 * config.intermediate_size + 4 * config.hidden_size) * itemsize
            )
            check_preallocation(slots=slots, context=context_length, total_bytes=total, in_use_bytes=total - free,
                                bytes_per_column=2 * config.num_hidden_layers * kv_heads * head_dim * itemsize,
                                reserve_bytes=activations + 5 * slots * config.vocab_size * 8,
                                utilization=memory_utilization)  # fmt: skip
            initial = context_length
        self.cache = KVCache(
            layers=config.num_hidden_layers,
            slots=slots,
            kv_heads=kv_heads,
            head_dim=head_dim,
            max_capacity=context_length,
            dtype=parameter.dtype,
            device=self.device,
            initial_capacity=initial,
        )
        # transformers 5.x renamed the forward's `past_key_values` to `cache`; use whichever it takes.
        self._cache_argument = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        # A CPU model with swapped kernels runs the lean forward (cpu_forward.py); any other its own.
        self._lean = LeanLlamaForward(model) if swapped(model) else None
        self.rows = 0  # the running rows are slots [0, rows)
        self.columns = [0] * slots  # host: the next column each row writes (a decode step adds one to all)
        self.offsets = [0] * slots  # host: the first column of each row (its left padding)
        self._columns = torch.zeros(slots, dtype=torch.int64, device=self.device)  # the same, on the device
        self._offsets = torch.zeros(slots, dtype=torch.int64, device=self.device)
        self._last_tokens = torch.zeros(
            slots, dtype=torch.int64, device=self.device
        )  # fed by the next decode

    # --- prefill --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def new_group(self, prompts: list[tuple[int, ...]], max_new_tokens: int = 0,
                  prompt_logprobs: list[int | None] | None = None) -> PrefillGroup:  # fmt: skip
        """Places newcomers in the top slots (the engine keeps running rows + group rows within the slots),
        and grows the cache now, once, to the columns they may reach, rather than step by step later.
        `prompt_logprobs`, per prompt: None, or how many alternatives its prompt logprobs carry."""
        length = max(len(p) for p in prompts)
        self.cache.ensure_capacity(min(self.cache.max_capacity, length + max_new_tokens))
        offsets = [length - len(p) for p in prompts]
        ids = [[self.pad_token_id] * offset + list(p) for offset, p in zip(offsets, prompts, strict=True)]
        input_ids = torch.tensor(ids, dtype=torch.int64).to(self.device)
        columns = torch.arange(length, device=self.device)
        offsets_t = torch.tensor(offsets, dtype=torch.int64).to(self.device)[:, None]
        real = columns[None, :] >= offsets_t
        position_ids = (columns[None, :] - offsets_t).clamp(min=0)
        wanted = prompt_logprobs or [None] * len(prompts)
        score_rows = [i for i, k in enumerate(wanted) if k is not None]
        top = max((wanted[i] for i in score_rows), default=0)
        index = torch.tensor(score_rows, dtype=torch.int64).to(self.device) if score_rows else None
        return PrefillGroup(self.slots - len(prompts), input_ids, position_ids, real, offsets,
                            score_rows=score_rows, score_index=index, score_top=top)  # fmt: skip

    @torch.inference_mode()
    def complete_group(self, group: PrefillGroup, keep: list[int]) -> int:
        """Moves the kept rows of a prefilled group (indices within the group) next to the running rows;
        returns the first row they now occupy. Rows not kept (cancelled) simply stay behind, unused."""
        first = self.rows
        moves = [(first + j, group.first_slot + i) for j, i in enumerate(keep)]
        # Ascending order is safe: a destination is never a source still waiting to be copied.
        self.cache.move_rows([(d, s) for d, s in moves if d != s], group.length)
        offsets = [group.offsets[i] for i in keep]
        rows = slice(first, first + len(keep))
        for row, offset in zip(range(rows.start, rows.stop), offsets, strict=True):
            self.columns[row], self.offsets[row] = group.length, offset
        self._columns[rows] = group.length
        self._offsets[rows] = torch.tensor(offsets, dtype=torch.int64).to(self.device)
        self.rows += len(keep)
        return first

    # --- decode ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def set_last_tokens(self, first: int, tokens: torch.Tensor) -> None:
        """The tokens rows first.. feed into the next decode step (the sampler's output, on the device)."""
        self._last_tokens[first : first + tokens.shape[0]] = tokens

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One decode step for every running row alone (`step` without a prefill chunk)."""
        return self.step(None, 0).decode

    @torch.inference_mode()
    def prefill_chunk(self, group: PrefillGroup, max_tokens: int) -> torch.Tensor | None:
        """The next prefill chunk of `group` alone (`step` without a decode step)."""
        return self.step(group, max_tokens, decode=False).prefill

    @torch.inference_mode()
    def step(self, group: PrefillGroup | None, max_prefill_tokens: int, decode: bool = True) -> StepLogits:
        """One iteration's model work: a decode step for every running row (each feeds its last token at its
        own column) and the next chunk of `group` (at most `max_prefill_tokens` tokens over its rows). The
        lean forward runs both as one forward; the model's own forward runs them one after the other.
        Returns float32 logits: each running row's, and each group row's last prompt token's once the
        group's prompts are complete."""
        decoding = decode and self.rows > 0
        segments = []
        if decoding:
            segments.append(self._decode_segment())
        if group is not None:
            segments.append(self._prefill_segment(group, max_prefill_tokens))
        if not segments:
            return StepLogits(None, None)
        if self._lean is not None:
            logits = self._lean(segments, self.cache)
        else:
            logits = [self._model_forward(segment) for segment in segments]
        result = StepLogits(None, None)
        if decoding:
            result.decode = logits.pop(0).last.float()
            self._columns[: self.rows] += 1
            for row in range(self.rows):
                self.columns[row] += 1
        if group is not None:
            start, group.done = group.done, segments[-1].write.attend
            if logits[0].every is not None:
                group.scored.append(self._score_prompt_chunk(group, logits[0].every, start))
            if group.finished:
                result.prefill = logits[0].last.float()
                if group.score_rows:
                    packed = torch.cat(group.scored, dim=1)
                    result.prompt = PromptScores(group.score_rows, group.score_top, packed)
        return result

    def _score_prompt_chunk(self, group: PrefillGroup, logits: torch.Tensor, start: int) -> torch.Tensor:
        """Prompt logprobs of one prefilled chunk: the logits at columns [start, end) of the scoring rows
        [n, T, vocab] score the tokens at columns start + 1 ... (the last column predicts no prompt token).
        Log-softmax in float32, as the sampler's logprobs. Returns [n, T', 2 + 2 * top] float64."""
        end = min(start + logits.shape[1], group.length - 1)
        targets = group.input_ids[group.score_index, start + 1 : end + 1]  # [n, T']
        logprobs = torch.log_softmax(logits[:, : end - start].float(), dim=-1)
        chosen = logprobs.gather(2, targets[..., None])
        parts = [targets[..., None].double(), chosen.double()]
        if group.score_top:
            values, ids = logprobs.topk(group.score_top, dim=-1)
            parts += [values.double(), ids.double()]
        return torch.cat(parts, dim=2)

    def _decode_segment(self) -> Segment:
        rows = self.rows
        for row in range(rows):
            if self.columns[row] >= self.cache.max_capacity:
                self._unpad(row)
        columns = self._columns[:rows]
        attend = max(self.columns[:rows]) + 1
        write = self.cache.prepare_decode(rows, columns, attend)
        keys = torch.arange(attend, device=self.device)
        mask = (keys[None, :] >= self._offsets[:rows, None]) & (keys[None, :] <= columns[:, None])
        positions = (columns - self._offsets[:rows])[:, None]
        return Segment(self._last_tokens[:rows, None], positions, mask[:, None, None, :], write,
                       spans=(self._offsets[:rows], columns))  # fmt: skip

    def _prefill_segment(self, group: PrefillGroup, max_tokens: int) -> Segment:
        start = group.done
        end = min(group.length, start + max(1, max_tokens // group.rows))
        write = self.cache.prepare_prefill(slice(group.first_slot, group.first_slot + group.rows), start, end)
        queries = torch.arange(start, end, device=self.device)
        keys = torch.arange(end, device=self.device)
        causal = keys[None, :] <= queries[:, None]  # [chunk, columns]
        itself = keys[None, :] == queries[:, None]
        mask = (group.real[:, None, :end] & causal[None]) | itself[None]  # [rows, chunk, columns]
        return Segment(group.input_ids[:, start:end], group.position_ids[:, start:end], mask[:, None], write,
                       group.score_index)  # fmt: skip

    def _model_forward(self, segment: Segment) -> SegmentLogits:
        """The model's own forward on one segment; the logits of each row's last position [rows, vocab], and
        of every position of the rows that asked (then the LM head runs over every row's positions)."""
        self.cache.plan(segment.write)
        every = segment.every_position
        output = self.model(input_ids=segment.input_ids, attention_mask=segment.mask,
                            position_ids=segment.position_ids, use_cache=True, logits_to_keep=0 if every is not None else 1,
                            **{self._cache_argument: self.cache})  # fmt: skip
        return SegmentLogits(output.logits[:, -1, :], output.logits[every] if every is not None else None)

    def _unpad(self, row: int) -> None:
        """A row at the last column drops its left padding: its context is its own tokens, not the group's
        padding (the engine ends a request when prompt + output reach the context)."""
        offset, end = self.offsets[row], self.columns[row]
        if offset == 0:
            raise RuntimeError(f"row {row} is at the cache's last column with no padding to drop")
        self.cache.unpad_row(row, offset, end)
        self.columns[row], self.offsets[row] = end - offset, 0
        self._columns[row] -= offset
        self._offsets[row] = 0

    # --- rows leaving ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def move_rows(self, moves: list[tuple[int, int]], rows: int) -> None:
        """Applies compaction moves (destination, source); afterwards the running rows are [0, rows)."""
        if moves:
            self.cache.move_rows(moves, max(self.columns[source] for _, source in moves))
        for destination, source in moves:
            self.columns[destination], self.offsets[destination] = self.columns[source], self.offsets[source]
            for tensor in (self._columns, self._offsets, self._last_tokens):
                tensor[destination] = tensor[source]
        self.rows = rows

    def cache_usage(self) -> float:
        """Fraction of the cache's allocated columns that running rows hold."""
        held = sum(self.columns[: self.rows])
        return held / (self.slots * self.cache.capacity)
