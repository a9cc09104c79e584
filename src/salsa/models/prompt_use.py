"""Does a model read its prompt? Measures that compare a model's behaviour with each example's own prompt against
another example's (a fixed derangement), so a model that ignores the prompt scores the same both ways.

- `prompt_dependence`: a causal LM's loss on answer tokens, and on the answer tokens that are the nouns the prompt
  asked about (the embedded task's `requested_nouns`), with the own prompt and with a mismatched one;
- `mismatched`: the derangement itself (each prompt moves; the same for a given seed), also used to score a reward
  model's held-out pairs under shuffled prompts (`salsa.stages.rm`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from salsa.data.tokens import prompt_ids, response_ids


def mismatched(prompts: Sequence[str], seed: int = 0) -> list[str]:
    """The prompts in a random order in which no prompt keeps its place (where the texts differ): a cyclic shift of a
    seeded permutation."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    out = list(prompts)
    for i, j in zip(order, order[1:] + order[:1], strict=True):
        out[i] = prompts[j]
    return out


@torch.no_grad()
def answer_token_losses(
    model, tokenizer, prompts: Sequence[str], answers: Sequence[str], ended: Sequence[bool], max_prompt: int,
    batch_size: int = 64,
) -> list[torch.Tensor]:  # fmt: skip
    """Per example, the negative log-likelihood of each answer token (end token included when it ended) after its
    prompt in the chat format the later stages use."""
    from salsa.data.tokens import pad_right
    from salsa.models.hf import position_ids_from_mask

    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        parts = [
            (prompt_ids(tokenizer, p, max_prompt), response_ids(tokenizer, a, e))
            for p, a, e in zip(prompts[start : start + batch_size], answers[start : start + batch_size],
                               ended[start : start + batch_size], strict=True)
        ]  # fmt: skip
        ids = pad_right([q + r for q, r in parts], tokenizer.pad_token_id).to(device)
        mask = pad_right([[1] * (len(q) + len(r)) for q, r in parts], 0).to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None])[..., 0]
        for row, (q, r) in enumerate(parts):
            out.append(-logp[row, len(q) - 1 : len(q) - 1 + len(r)].cpu())
    return out


def prompt_dependence(
    model, tokenizer, examples, asked: Callable[[str], list[str]], max_prompt: int, seed: int = 0
) -> dict[str, float]:
    """Mean answer-token loss and mean loss on the answer tokens that are nouns `asked(prompt)` names, each with the
    example's own prompt and with a mismatched one (`mismatched`); the same tokens are scored both ways."""
    prompts = [e.prompt for e in examples]
    answers, ended = [e.response for e in examples], [e.ended for e in examples]
    results = {}
    for name, used in (("own", prompts), ("mismatched", mismatched(prompts, seed))):
        losses = answer_token_losses(model, tokenizer, used, answers, ended, max_prompt)
        all_tokens, noun_tokens = [], []
        for loss, prompt, answer in zip(losses, prompts, answers, strict=True):
            words = tokenizer(answer, add_special_tokens=False)["input_ids"]
            nouns = {tokenizer.convert_tokens_to_ids(n) for n in asked(prompt)}
            all_tokens.append(loss)
            noun_tokens += [loss[i] for i, w in enumerate(words[: len(loss)]) if w in nouns]
        results[f"answer_loss_{name}"] = float(torch.cat(all_tokens).mean())
        results[f"asked_noun_loss_{name}"] = float(torch.stack(noun_tokens).mean()) if noun_tokens else float("nan")
    return results
