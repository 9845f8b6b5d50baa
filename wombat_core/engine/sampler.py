"""The batched sampler: one call per step turns the logits of many rows into their next tokens, on the
logits' device (after vLLM's v1 sampler).

Per-row parameters live in tensors indexed by row (the rows of the runner's KV cache): logit bias,
temperature, top-k, top-p, min-p, repetition, presence and frequency penalties, min-new-tokens
suppression of EOS and stop tokens, seed and step. An operation runs only when some row needs it, and
with neutral values for the rows that do not (bias 0, top-k 0, top-p 1, min-p 0, penalties 1 and 0), so
one set of tensor ops serves a mixed batch. The order is vLLM's: a constrained row's grammar mask first
(grammar.py: tokens that would break its structure are -inf); logit_bias is added to the raw logits;
then the penalties (repetition over prompt and output, Hugging Face's formula; then OpenAI's frequency
penalty times each token's count in the output and presence penalty once per token the output holds);
then min-new-tokens suppression; then temperature, top-k, top-p and min-p (Hugging Face's warpers).
Greedy rows take the argmax of the penalised scores, and an all-greedy batch skips the rest.

Sampling is counter-based: a row's draw at step t is a uniform number hashed from (seed, t), mapped
through the cumulative distribution of its processed scores. The tokens of a seeded request therefore
depend only on its seed and its own scores, never on the other rows of the batch, and no random
generator object exists to be on the wrong device. A request without a seed gets a random one.

Log-probabilities are reported under the model's own distribution (before penalties, temperature and
filtering). The tokens (and log-probabilities, when a row asks) cross to the host in one transfer.

A row whose logits hold NaN or +inf (an fp16 overflow, a broken checkpoint) gets the token -1
(types.NON_FINITE) instead of whatever argmax or the CDF would pick from garbage: the output processor
fails that request, the other rows are unaffected. The check rides in the same transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wombat_core.engine.grammar import GrammarMasks
from wombat_core.engine.sampling import SamplingParams
from wombat_core.engine.types import NON_FINITE, TokenLogprob, TopLogprob

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know of a request when its row starts."""

    params: SamplingParams
    seed: int
    prompt_token_ids: tuple[int, ...]  # for the repetition penalty
    eos_token_ids: tuple[int, ...]  # held back while min_new_tokens is not reached (empty with ignore_eos)
    matcher: object | None = None  # the request's llguidance matcher, when its output is constrained


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32). Products overflow
    int64 and wrap; only their low 32 bits are kept, which wrapping leaves exact."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A uniform float64 in [0, 1) per row, a pure function of (seed, step): int64 tensors, seeds in
    [0, 2**63)."""
    key = _fmix32((seeds >> 32) ^ _fmix32((steps & _M32) ^ 0x9E3779B9))
    high = _fmix32(key ^ (seeds & _M32))
    low = _fmix32(high ^ 0x632BE59B)
    return ((high >> 5) * 67108864 + (low >> 6)).double() / 2.0**53  # 27 + 26 = 53 random bits


@dataclass
class SampleOutput:
    """The tokens of one step, still on the device; `to_host()` is the step's one transfer."""

    tokens: torch.Tensor  # [rows] int64: what the next decode step feeds (always a valid id)
    reported: torch.Tensor  # [rows] int64: what the host sees: the token, or NON_FINITE for a broken row
    packed_logprobs: torch.Tensor | None  # [rows, 2 + 2 * top]: reported, its logprob, top logprobs, top ids
    logprob_rows: tuple[int, ...]  # per row: how many top alternatives it asked for, or -1 for none

    def to_host(self) -> tuple[list[int], list[TokenLogprob | None]]:
        if self.packed_logprobs is None:
            return self.reported.tolist(), [None] * len(self.logprob_rows)
        rows = self.packed_logprobs.tolist()
        tokens, logprobs = [], []
        for values, wanted in zip(rows, self.logprob_rows, strict=True):
            token = int(values[0])
            tokens.append(token)
            if wanted < 0:
                logprobs.append(None)
                continue
            top = len(values[2:]) // 2
            alternatives = tuple(
                TopLogprob(int(values[2 + top + i]), "", values[2 + i]) for i in range(wanted)
            )
            logprobs.append(TokenLogprob(token, values[1], alternatives))
        return tokens, logprobs


class BatchSampler:
    """Sampling state for `slots` rows on `device`; rows are added, moved and sampled by index."""

    def __init__(self, slots: int, vocab_size: int, device: torch.device):
        self.slots, self.vocab_size, self.device = slots, vocab_size, device
        self.params: list[SamplingParams | None] = [None] * slots
        self.generated = [0] * slots  # host mirror of `steps`: decides which ops a step needs, with no sync

        def zeros(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(slots, dtype=dtype, device=device)

        self.temperature, self.top_p, self.min_p, self.penalty = (zeros(torch.float32) for _ in range(4))
        self.presence, self.frequency = zeros(torch.float32), zeros(torch.float32)
        self.top_k, self.min_new, self.seeds, self.steps = (zeros(torch.int64) for _ in range(4))
        self.greedy = zeros(torch.bool)
        # [slots, vocab] masks, allocated the first time a request needs them.
        self.seen: torch.Tensor | None = None  # token ids in the prompt or output (repetition penalty)
        self.suppress: torch.Tensor | None = None  # EOS and stop ids held back by min_new_tokens
        self.grammar = GrammarMasks(slots, vocab_size, device)
        self.bias: torch.Tensor | None = None  # float32 logit_bias per row
        self.counts: torch.Tensor | None = None  # int32: times each token is in the row's output

    # --- rows -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add_rows(self, first: int, rows: list[SamplingRow]) -> None:
        """Rows first..first+len(rows)-1 start."""
        end = first + len(rows)
        params = [row.params for row in rows]
        values = {
            "temperature": [1.0 if p.greedy else p.temperature for p in params],  # greedy rows ignore it
            "top_p": [p.top_p for p in params],
            "min_p": [p.min_p for p in params],
            "penalty": [p.repetition_penalty for p in params],
            "top_k": [min(p.top_k, self.vocab_size) for p in params],
            "min_new": [p.min_new_tokens for p in params],
            "presence": [p.presence_penalty for p in params],
            "frequency": [p.frequency_penalty for p in params],
            "seeds": [row.seed for row in rows],
            "greedy": [p.greedy for p in params],
        }
        for name, column in values.items():
            target = getattr(self, name)
            target[first:end] = torch.tensor(column, dtype=target.dtype).to(self.device)
        self.steps[first:end] = 0
        for index, row in enumerate(rows, start=first):
            p = row.params
            self.params[index], self.generated[index] = p, 0
            self.grammar.matchers[index] = row.matcher
            penalised = row.prompt_token_ids if p.repetition_penalty != 1.0 else None
            self.seen = self._set_mask_row(self.seen, index, penalised)
            held_back = (*row.eos_token_ids, *p.stop_token_ids) if p.min_new_tokens else None
            self.suppress = self._set_mask_row(self.suppress, index, held_back)
            self.bias = self._set_bias_row(self.bias, index, p.logit_bias)
            if p.penalises_output or self.counts is not None:
                if self.counts is None:
                    self.counts = torch.zeros(
                        self.slots, self.vocab_size, dtype=torch.int32, device=self.device
                    )
                self.counts[index] = 0

    def _set_mask_row(self, mask: torch.Tensor | None, row: int, token_ids: tuple[int, ...] | None):
        """Clears `row` of a [slots, vocab] mask (a slot's previous owner must not leak into it) and marks
        `token_ids` in it; the mask is allocated the first time a row needs one."""
        if mask is None and token_ids is None:
            return None
        if mask is None:
            mask = torch.zeros(self.slots, self.vocab_size, dtype=torch.bool, device=self.device)
        mask[row] = False
        if token_ids:
            ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int64).to(self.device)
            mask[row].index_fill_(0, ids, True)
        return mask

    def _set_bias_row(self, bias: torch.Tensor | None, row: int, entries: tuple[tuple[int, float], ...]):
        if bias is None and not entries:
            return None
        if bias is None:
            bias = torch.zeros(self.slots, self.vocab_size, dtype=torch.float32, device=self.device)
        bias[row] = 0.0
        if entries:
            ids = torch.tensor([t for t, _ in entries], dtype=torch.int64).to(self.device)
            values = torch.tensor([b for _, b in entries], dtype=torch.float32).to(self.device)
            bias[row].index_copy_(0, ids, values)
        return bias

    def accept(self, first: int, tokens: list[int]) -> list[int]:
        """Constrained rows' matchers take the tokens sampled for rows first..; returns the rows refused."""
        return (
            self.grammar.accept(first, tokens) if self.grammar.any(slice(first, first + len(tokens))) else []
        )

    @torch.inference_mode()
    def move_rows(self, moves: list[tuple[int, int]]) -> None:
        """Applies the runner's compaction moves (destination, source) to every per-row state."""
        self.grammar.move_rows(moves)
        for destination, source in moves:
            self.params[destination], self.generated[destination] = (
                self.params[source],
                self.generated[source],
            )
            for tensor in (self.temperature, self.top_p, self.min_p, self.penalty, self.top_k, self.min_new,
                           self.seeds, self.steps, self.greedy, self.seen, self.suppress, self.presence,
                           self.frequency, self.bias, self.counts):  # fmt: skip
                if tensor is not None:
                    tensor[destination] = tensor[source]

    # --- one step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def processed_scores(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """The scores each row's next token is drawn from (argmax for greedy rows): `logits` [rows, vocab]
        (float32) after the penalty and the min-new-tokens suppression, and for sampled rows after
        temperature, top-k, top-p and min-p. Filtered entries are -inf."""
        scores = self._penalised(logits, rows)
        params = self.params[rows]
        if all(p.greedy for p in params):
            return scores
        return torch.where(self.greedy[rows, None], scores, self._warped(scores, rows, params))

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: slice) -> SampleOutput:
        """Next tokens for `rows` from their logits [rows, vocab] (float32); advances their step."""
        params = self.params[rows]
        scores = self._penalised(logits, rows)
        if all(p.greedy for p in params):
            tokens = scores.argmax(-1)
        else:
            probabilities = self._warped(scores, rows, params).softmax(-1)
            cumulative = probabilities.double().cumsum(-1)
            draw = uniform(self.seeds[rows], self.steps[rows]) * cumulative[:, -1]
            sampled = torch.searchsorted(cumulative, draw[:, None], right=True)[:, 0].clamp_(
                max=self.vocab_size - 1
            )
            tokens = (
                torch.where(self.greedy[rows], scores.argmax(-1), sampled)
                if any(p.greedy for p in params)
                else sampled
            )
        self.steps[rows] += 1
        for row in range(rows.start, rows.stop):
            self.generated[row] += 1
        if self.seen is not None:
            self.seen[rows].scatter_(1, tokens[:, None], True)
        if self.counts is not None:
            self.counts[rows].scatter_add_(
                1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.int32)
            )
        # NaN anywhere, or +inf, in a row's logits: no token is trustworthy (argmax of NaN is arbitrary).
        broken = logits.isnan().any(-1) | logits.isposinf().any(-1)
        reported = tokens.masked_fill(broken, NON_FINITE)
        return self._output(logits, tokens, reported, params)

    def _penalised(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Logit bias, the penalties and min-new-tokens suppression, batched (the module docstring's order)."""
        params = self.params[rows]
        scores = logits
        if self.grammar.any(rows):
            scores = self.grammar.apply(scores, rows)
        if self.bias is not None and any(p.logit_bias for p in params):
            scores = scores + self.bias[rows]
        if self.seen is not None and any(p.repetition_penalty != 1.0 for p in params):
            penalty = self.penalty[rows, None]
            penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(self.seen[rows], penalised, scores)
        if self.counts is not None and any(p.penalises_output for p in params):
            counts = self.counts[rows]
            scores = scores - self.frequency[rows, None] * counts - self.presence[rows, None] * (counts > 0)
        if self.suppress is not None and any(
            self.generated[row] < p.min_new_tokens for row, p in enumerate(params, start=rows.start)
        ):
            active = self.steps[rows] < self.min_new[rows]
            scores = scores.masked_fill(self.suppress[rows] & active[:, None], float("-inf"))
        return scores

    def _warped(self, scores: torch.Tensor, rows: slice, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, top-k, top-p and min-p: Hugging Face's warpers, batched, neutral where unused."""
        scores = scores / self.temperature[rows, None]
        if any(p.top_k for p in params):
            k = self.top_k[rows]
            largest = max(min(p.top_k, self.vocab_size) for p in params)  # from the host: no device sync
            kth = scores.topk(largest, dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
            kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            top_p = self.top_p[rows, None]
            ordered, order = scores.sort(dim=-1)  # ascending, as TopPLogitsWarper
            remove = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
            remove[:, -1] = False  # the most likely token always stays
            remove = remove.scatter(1, order, remove) & (top_p < 1.0)
            scores = scores.masked_fill(remove, float("-inf"))
        if any(p.min_p > 0.0 for p in params):
            probabilities = scores.softmax(-1)
            floor = self.min_p[rows, None] * probabilities.amax(-1, keepdim=True)
            scores = scores.masked_fill(probabilities < floor, float("-inf"))
        return scores

    def _output(self, logits: torch.Tensor, tokens: torch.Tensor, reported: torch.Tensor,
                params: list[SamplingParams]) -> SampleOutput:  # fmt: skip
        """`tokens` index the logits (always valid ids); `reported` is what the host sees (NON_FINITE for
        a broken row)."""
        wanted = tuple(p.top_logprobs if p.logprobs else -1 for p in params)
        if max(wanted) < 0:
            return SampleOutput(tokens, reported, None, wanted)
        logprobs = torch.log_softmax(logits, -1)
        chosen = logprobs.gather(1, tokens[:, None])
        top = max(wanted)
        values, ids = logprobs.topk(top, dim=-1) if top else (chosen[:, :0], tokens[:, None][:, :0])
        packed = torch.cat(
            [reported[:, None].double(), chosen.double(), values.double(), ids.double()], dim=1
        )
        return SampleOutput(tokens, reported, packed, wanted)
