"""Candidate responses for RRHF data (REFERENCE.md §3).

`diverse_beam_search` implements Hamming-diversity group beam search (Vijayakumar et al.) for the
reference's setting of one beam per group (4 beams in 4 groups, diversity penalty 1.0): at each step the
groups choose in order, and each token's log-probability is lowered by `diversity_penalty` times the
number of earlier groups that chose it at this step. (transformers 5 moved group beam search to a hub
download, which is unreachable here; with one beam per group this is that algorithm, except that a group
stops at its first EOS instead of also keeping a non-EOS continuation that could outscore it.)
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


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
    for _ in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), -1)
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
