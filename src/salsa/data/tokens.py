"""Tokenisation shared by every stage: one place decides how a prompt and a response become token ids."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from salsa.data.synthetic import Example

IGNORE = -100  # label value ignored by the cross-entropy loss
log = logging.getLogger("salsa")


SENTINEL = "\u2063salsa-content\u2063"  # marks where a turn's text goes when the template is rendered around it


def _render(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ending in a user turn, ready for the assistant's answer: the tokenizer's chat
    template when it has one, else BOS and the turns' texts each followed by a blank line."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer("".join(f"{m['content']}\n\n" for m in messages), add_special_tokens=False)["input_ids"]


def _around_last_turn(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The token ids before and after the last turn's text: BOS, the template's markers and earlier turns before,
    the end of the turn and the generation prompt after."""
    marked = [*messages[:-1], {**messages[-1], "content": SENTINEL}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
        before, found, after = text.partition(SENTINEL)
        if not found:
            raise ValueError("the tokenizer's chat template does not show the user's text verbatim")
        # the rendered text holds the special tokens as text (e.g. <bos>); they tokenise back to themselves
        encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] if t else []  # noqa: E731
        return encode(before), encode(after)
    head = (
        _render(tokenizer, messages[:-1])
        if len(messages) > 1
        else ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
    )
    return head, tokenizer("\n\n", add_special_tokens=False)["input_ids"]


def chat_ids(tokenizer, messages: Sequence[dict[str, str]], max_length: int | None = None) -> list[int]:
    """Token ids of a conversation ending in a user turn, ready for the assistant's answer, at most `max_length`.

    Too long, it loses text, never structure: first whole earlier exchanges (oldest first), then the start of the
    last user turn's text. BOS, the template's role markers and the generation prompt always stay (a model such as
    Gemma misbehaves without BOS, and without the generation prompt the answer is not the assistant's).
    """
    messages = list(messages)
    ids = _render(tokenizer, messages)
    while max_length is not None and len(ids) > max_length and len(messages) > 2:
        messages = messages[2:]  # the oldest user turn and its answer
        ids = _render(tokenizer, messages)
    if max_length is None or len(ids) <= max_length:
        return ids
    before, after = _around_last_turn(tokenizer, messages)
    room = max_length - len(before) - len(after)
    if room < 1:
        raise ValueError(
            f"a prompt length of {max_length} tokens leaves no room for the text: the chat template alone takes "
            f"{len(before) + len(after)}"
        )
    text = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    return before + text[-room:] + after  # keep the end of the text: the question usually closes it


def prompt_ids(tokenizer, prompt: str, max_length: int | None = None) -> list[int]:
    """Token ids of one user turn ready for the assistant's answer (see `chat_ids` for how it is cut to fit)."""
    return chat_ids(tokenizer, [{"role": "user", "content": prompt}], max_length)


def report_long_prompts(tokenizer, prompts: Sequence[str], max_length: int, key: str) -> int:
    """Log how many prompts exceed `max_length` tokens (their text is cut from its start, BOS and the chat template
    kept); return the count."""
    n = sum(len(prompt_ids(tokenizer, p)) > max_length for p in prompts)
    if n:
        log.warning(
            "%d of %d prompts are longer than %s=%d tokens and are truncated: the start of their text is cut, "
            "BOS and the chat template are kept",
            n,
            len(prompts),
            key,
            max_length,
        )
    return n


def response_ids(tokenizer, response: str, ended: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if ended else [])


def pair_ids(tokenizer, pair, max_prompt: int, max_response: int) -> tuple[list[int], list[int], list[int]]:
    """A preference pair's (prompt, chosen, rejected) token ids, each response cut to `max_response` tokens."""
    return (
        prompt_ids(tokenizer, pair.prompt, max_prompt),
        response_ids(tokenizer, pair.chosen, pair.chosen_ended)[:max_response],
        response_ids(tokenizer, pair.rejected, pair.rejected_ended)[:max_response],
    )


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
