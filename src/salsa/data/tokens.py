"""Tokenisation shared by every stage: one place decides how a prompt and a response become token ids."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from salsa.data.synthetic import Example

IGNORE = -100  # label value ignored by the cross-entropy loss
log = logging.getLogger("salsa")


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
