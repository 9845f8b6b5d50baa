"""Candidate responses for RRHF data (REFERENCE.md §3): k candidates per query from the policy, scored by
a reward model, as RRHF training records.

`generate_candidates` is the whole job in plain torch; the rrhf service runs it in a Ray task.
Candidates come from diverse beam search (the reference's method) or from sampling through the
inference engine (temperature 1, a seed per candidate, the k samples batched together).

`diverse_beam_search` implements Hamming-diversity group beam search (Vijayakumar et al.) for the
reference's setting of one beam per group (4 beams in 4 groups, diversity penalty 1.0): at each step the
groups choose in order, and each token's log-probability is lowered by `diversity_penalty` times the
number of earlier groups that chose it at this step. (transformers 5 moved group beam search to a hub
download, which is unreachable here; with one beam per group this is that algorithm, except that a group
stops at its first EOS instead of also keeping a non-EOS continuation that could outscore it, and that
no group may end before its first token: an empty candidate is not RRHF data.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
from transformers import DynamicCache

from wombat_core.errors import Cancelled, FailedPrecondition, InvalidArgument
from wombat_core.prompts import alpaca_prompt_from_query
from wombat_core.rrhf.data import PreferenceRecord

MAX_CANDIDATE_QUERIES = 10_000


class CandidateMethod(StrEnum):
    DIVERSE_BEAM_SEARCH = "diverse_beam_search"
    SAMPLING = "sampling"


@dataclass(frozen=True)
class CandidatesConfig:
    """One candidate-generation job, validated once here. Defaults are the reference's (4 candidates of at
    most 128 new tokens, diverse beam search)."""

    queries: tuple[str, ...]
    num_candidates: int = 4
    max_new_tokens: int = 128
    method: CandidateMethod = CandidateMethod.DIVERSE_BEAM_SEARCH
    seed: int = 42  # sampling: candidate j of query i uses seed + i * num_candidates + j

    def __post_init__(self) -> None:
        def fail(field: str, message: str) -> None:
            raise InvalidArgument(message, metadata={"field": field})

        if not 1 <= len(self.queries) <= MAX_CANDIDATE_QUERIES:
            fail(
                "queries", f"queries must hold 1 to {MAX_CANDIDATE_QUERIES} entries, got {len(self.queries)}"
            )
        if any(not q.strip() for q in self.queries):
            fail("queries", "every query must be non-empty")
        if not 1 <= self.num_candidates <= 16:
            fail("num_candidates", f"num_candidates must be in [1, 16], got {self.num_candidates}")
        if not 1 <= self.max_new_tokens <= 2048:
            fail("max_new_tokens", f"max_new_tokens must be in [1, 2048], got {self.max_new_tokens}")
        if not isinstance(self.method, CandidateMethod):
            fail("method", f"method must be one of {', '.join(CandidateMethod)}, got {self.method!r}")


def generate_candidates(policy, reward, config: CandidatesConfig, *,
                        on_progress: Callable[[int, int], None] = lambda done, total: None,
                        cancelled: Callable[[], bool] = lambda: False) -> list[PreferenceRecord]:  # fmt: skip
    """For each query (wrapped in the Alpaca template): k candidates from `policy` (a LoadedModel), scored
    by `reward` (a RewardModel) on prompt + candidate. Raises Cancelled when `cancelled()` turns true
    between queries, and whatever generation raised: a failed candidate fails the job."""
    from wombat_core.engine import Engine, EngineConfig

    engine = None
    if config.method is CandidateMethod.SAMPLING:
        engine = Engine(policy.model, policy.tokenizer,
                        EngineConfig(max_batch_size=config.num_candidates, context_length=policy.context_length))  # fmt: skip
        engine.start()
    records = []
    try:
        for index, query in enumerate(config.queries):
            if cancelled():
                raise Cancelled(f"cancelled after {index} of {len(config.queries)} queries")
            prompt = alpaca_prompt_from_query(query)
            ids = list(policy.tokenizer(prompt)["input_ids"])
            if engine is None:
                candidates = diverse_beam_search(policy.model, policy.tokenizer, ids, num_groups=config.num_candidates,
                                                 max_new_tokens=config.max_new_tokens)  # fmt: skip
            else:
                first_seed = config.seed + index * config.num_candidates
                candidates = sample_candidates(
                    engine, ids, config.num_candidates, config.max_new_tokens, first_seed
                )
            scores = reward.score([prompt + c for c in candidates])
            records.append(PreferenceRecord(query, tuple(candidates), tuple(scores)))
            on_progress(index + 1, len(config.queries))
    finally:
        if engine is not None:
            engine.stop()
    return records


SAMPLING_ATTEMPTS = 5


def sample_candidates(engine, prompt_ids: list[int], k: int, max_new_tokens: int, seed: int) -> list[str]:
    """k independent samples (temperature 1, seeds seed..seed+k-1), batched together by the engine.

    An empty answer is not RRHF data (responses must be non-empty), so EOS is held back for the first token
    and a candidate whose text is still empty (only whitespace) is drawn again with the next seeds, up to
    SAMPLING_ATTEMPTS times. An engine failure is raised, never turned into an empty candidate."""
    from wombat_core.engine import GenerationRequest, SamplingParams

    texts, pending = [""] * k, list(range(k))
    for attempt in range(SAMPLING_ATTEMPTS):
        streams = {  # all submitted before any is read, so they decode as one batch
            i: engine.generate(GenerationRequest(f"candidate-{seed}-{i}-{attempt}", tuple(prompt_ids),
                                                 SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens,
                                                                min_new_tokens=1, seed=seed + i + attempt * k)))
            for i in pending
        }  # fmt: skip
        for i, stream in streams.items():
            texts[i] = "".join(event.text for batch in stream for event in batch).strip()
        pending = [i for i in pending if not texts[i]]
        if not pending:
            return texts
    raise FailedPrecondition(
        f"{len(pending)} of {k} sampled candidates stayed empty after {SAMPLING_ATTEMPTS} draws each: the policy "
        "ends its answers at once; check the model or raise max_new_tokens"
    )


@torch.inference_mode()
def diverse_beam_search(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[int],
    *,
    num_groups: int = 4,
    diversity_penalty: float = 1.0,
    max_new_tokens: int = 128,
) -> list[str]:
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    input_ids = torch.tensor([prompt_ids] * num_groups, device=device)
    cache = DynamicCache()
    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    outputs: list[list[int]] = [[] for _ in range(num_groups)]
    done = [False] * num_groups
    position = len(prompt_ids)
    for step in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), -1)
        if step == 0:
            logprobs[:, eos] = float(
                "-inf"
            )  # an empty candidate is not RRHF data: every group says something
        chosen_counts = torch.zeros(logprobs.shape[-1], device=device)
        tokens = []
        for group in range(num_groups):
            if done[group]:
                tokens.append(eos)
                continue
            token = int(torch.argmax(logprobs[group] - diversity_penalty * chosen_counts))
            chosen_counts[token] += 1
            tokens.append(token)
            if token == eos:
                done[group] = True
            else:
                outputs[group].append(token)
        if all(done):
            break
        step = torch.tensor(tokens, device=device)[:, None]
        logits = model(input_ids=step, past_key_values=cache, use_cache=True,
                       position_ids=torch.full((num_groups, 1), position, device=device)).logits[:, -1]  # fmt: skip
        position += 1
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
