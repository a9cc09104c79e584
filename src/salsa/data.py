"""Task data (what the stages train and judge on) and the tokenisation shared by every stage.

A task is a `TaskData`: plain documents for pretraining the tiny base model, SFT demonstrations, preference pairs,
prompts for PPO and for evaluation, and optionally a gold judge. `data=synthetic` builds one from the embedded task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from salsa.task.synthetic import Example, Pair, SyntheticTask, gold_reward

IGNORE = -100  # label value ignored by the cross-entropy loss
log = logging.getLogger("salsa")


@dataclass
class TaskData:
    name: str
    sft_train: list[Example]
    sft_val: list[Example]
    pairs_train: list[Pair]
    pairs_val: list[Pair]
    prompts_train: list[str]
    prompts_eval: list[str]
    pretrain: list[str] = field(default_factory=list)
    judge: Callable[[str, str, bool], float] | None = None  # gold reward r*(prompt, response, ended)


def synthetic_data(
    seed: int = 0,
    rater_temperature: float = 1.0,
    n_pretrain: int = 8000,
    n_sft: int = 4000,
    n_sft_val: int = 400,
    n_pairs: int = 3000,
    n_pairs_val: int = 500,
    n_prompts: int = 2000,
    n_eval_prompts: int = 200,
) -> TaskData:
    task = SyntheticTask(seed, rater_temperature)
    sft = task.sft_examples(n_sft + n_sft_val)
    return TaskData(
        name="synthetic",
        pretrain=task.pretrain_documents(n_pretrain),
        sft_train=sft[:n_sft],
        sft_val=sft[n_sft:],
        pairs_train=task.preference_pairs(n_pairs, "train"),
        pairs_val=task.preference_pairs(n_pairs_val, "val"),
        prompts_train=task.prompts(n_prompts, "train"),
        prompts_eval=task.prompts(n_eval_prompts, "eval"),
        judge=gold_reward,
    )


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation: one place decides how a prompt and a response become token ids
# ---------------------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, prompt: str, max_length: int | None = None) -> list[int]:
    """Token ids of a user turn ready for the assistant's answer (the tokenizer's chat template when it has one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    else:
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + tokenizer(
            f"{prompt}\n\n", add_special_tokens=False
        )["input_ids"]
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]  # keep the end: the generation prompt must stay
    return ids


def report_long_prompts(tokenizer, prompts: Sequence[str], max_length: int, key: str) -> int:
    """Log how many prompts exceed `max_length` tokens (they are truncated to their last tokens); return the count."""
    n = sum(len(prompt_ids(tokenizer, p)) > max_length for p in prompts)
    if n:
        log.warning(
            "%d of %d prompts are longer than %s=%d tokens and are truncated to their last %d tokens",
            n,
            len(prompts),
            key,
            max_length,
            max_length,
        )
    return n


def response_ids(tokenizer, response: str, ended: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if ended else [])


def pad_right(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def pad_left(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)


def lm_batch(items: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (context, target) pairs: the loss covers only the target tokens."""
    seqs = [c + t for c, t in items]
    labels = [[IGNORE] * len(c) + t for c, t in items]
    input_ids = pad_right(seqs, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
        "labels": pad_right(labels, IGNORE),
    }


class LMDataset(torch.utils.data.Dataset):
    """(context ids, target ids) pairs for causal-LM training; context is masked out of the loss."""

    def __init__(self, items: list[tuple[list[int], list[int]]]):
        self.items = items

    @classmethod
    def from_documents(cls, tokenizer, docs: Sequence[str], max_length: int) -> LMDataset:
        items = []
        for d in docs:
            ids = [tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False)["input_ids"]
            items.append(([], (ids + [tokenizer.eos_token_id])[:max_length]))
        return cls(items)

    @classmethod
    def from_examples(cls, tokenizer, examples: Sequence[Example], max_prompt: int, max_response: int) -> LMDataset:
        return cls(
            [
                (
                    prompt_ids(tokenizer, e.prompt, max_prompt),
                    response_ids(tokenizer, e.response, e.ended)[:max_response],
                )
                for e in examples
            ]
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.items[i]
