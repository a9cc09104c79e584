"""Hub preference datasets as `TaskData`: UltraFeedback (binarized) and Anthropic HH-RLHF.

Each loader reads the hub dataset with `datasets.load_dataset`, or local jsonl/parquet files in the same schema
(`data.path=/dir`, one file per split named after it: `train_prefs.jsonl`, `test.parquet`, ...). Rows with an empty
prompt or response, or text longer than the configured limits, are dropped and counted in the log; a missing column
fails with a message naming it. There is no gold judge: evaluation judges with the reward model.

- `ultrafeedback`: HuggingFaceH4/ultrafeedback_binarized. SFT on `train_sft` (`test_sft` held out), reward
  model on `train_prefs` / `test_prefs`, PPO prompts from `train_prefs`, evaluation prompts from `test_prefs`.
- `hh_rlhf`: Anthropic/hh-rlhf, `chosen`/`rejected` transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...") split
  into the dialogue before the final assistant turn (the prompt) and that turn (the response). SFT on the chosen
  responses of `train` (`test` held out), pairs from `train` / `test`, prompts likewise.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from salsa.data import schemas
from salsa.data.schemas import FORMATS
from salsa.data.synthetic import Example, Pair
from salsa.data.task import TaskData
from salsa.errors import SalsaError

log = logging.getLogger("salsa")

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


class DataError(SalsaError, ValueError):
    """A data file or row that does not have the expected schema."""


class Splits(NamedTuple):
    """What a hub dataset provides, before subsampling."""

    sft_train: list[Example]
    sft_test: list[Example]
    pairs_train: list[Pair]
    pairs_test: list[Pair]


# ---------------------------------------------------------------------------------------------------------------
# Reading splits
# ---------------------------------------------------------------------------------------------------------------
def split_file(path: str | os.PathLike, split: str) -> Path:
    """The local file of `split` under `path` (see `salsa.data.schemas`)."""
    try:
        return schemas.split_file(path, split)
    except schemas.DataFileError as e:
        raise DataError(f"data.path: {e}") from e


def read_split(dataset: str, path: str | None, split: str, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of one split, from local files when `path` is set, else from the hub; checks the columns exist."""
    import datasets

    if path:
        file = split_file(path, split)
        ds = datasets.load_dataset(FORMATS[file.suffix], data_files={split: str(file)}, split=split)
        source = str(file)
    else:
        ds = datasets.load_dataset(dataset, split=split)
        source = f"{dataset}:{split}"
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{source} has no column {missing[0]!r} (columns: {ds.column_names}); expected the {dataset} schema "
            f"with columns {list(columns)}"
        )
    return ds.select_columns(list(columns)).to_list()


def subsample(rows: list, n: int | None, seed: int) -> list:
    """The first n rows after a seeded shuffle (all rows, shuffled, when n is None)."""
    import random

    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows if n is None else rows[:n]


def keep_valid(
    items: Iterable[Any], reasons: Callable[[Any], str | None], what: str
) -> tuple[list[Any], dict[str, int]]:
    """Items for which `reasons(item)` is None; the others are counted by reason and logged."""
    kept, dropped = [], Counter()
    for item in items:
        reason = reasons(item)
        if reason is None:
            kept.append(item)
        else:
            dropped[reason] += 1
    if dropped:
        log.info("[data] %s: kept %d, dropped %s", what, len(kept), dict(dropped))
    return kept, dict(dropped)


def text_problem(prompt: str, responses: Sequence[str], max_prompt_chars: int, max_response_chars: int) -> str | None:
    """Why a row is unusable (None if it is fine). Limits are in characters: data is read before any tokenizer."""
    if not prompt.strip():
        return "empty prompt"
    if any(not r.strip() for r in responses):
        return "empty response"
    if len(prompt) > max_prompt_chars:
        return "prompt too long"
    if any(len(r) > max_response_chars for r in responses):
        return "response too long"
    return None


# ---------------------------------------------------------------------------------------------------------------
# UltraFeedback (binarized)
# ---------------------------------------------------------------------------------------------------------------
def last_assistant(messages: Sequence[dict[str, str]], where: str) -> str:
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError(f"{where}: the conversation does not end with an assistant turn")
    return messages[-1].get("content") or ""


def read_ultrafeedback(dataset: str, path: str | None, limits: tuple[int, int]) -> Splits:
    def examples(split: str) -> list[Example]:
        rows = read_split(dataset, path, split, schemas.SPLIT_COLUMNS["ultrafeedback"][split])
        items = [Example(r["prompt"], last_assistant(r["messages"], f"{split} row")) for r in rows]
        return keep_valid(items, lambda e: text_problem(e.prompt, [e.response], *limits), split)[0]

    def pairs(split: str) -> list[Pair]:
        rows = read_split(dataset, path, split, schemas.SPLIT_COLUMNS["ultrafeedback"][split])
        items = [
            Pair(
                r["prompt"],
                last_assistant(r["chosen"], f"{split} chosen"),
                last_assistant(r["rejected"], f"{split} rejected"),
                gold_margin=None,  # no gold reward on hub data
            )
            for r in rows
        ]
        return keep_valid(items, lambda p: text_problem(p.prompt, [p.chosen, p.rejected], *limits), split)[0]

    return Splits(examples("train_sft"), examples("test_sft"), pairs("train_prefs"), pairs("test_prefs"))


def distinct(items: Iterable[str]) -> list[str]:
    """Each item once, in first-seen order."""
    return list(dict.fromkeys(items))


def documents(examples: Sequence[Example], n: int) -> list[str]:
    """Plain documents (prompt and response) for pretraining the embedded tiny model on hub data."""
    return [f"{e.prompt} {e.response}" for e in examples[:n]]


# ---------------------------------------------------------------------------------------------------------------
# Anthropic HH-RLHF
# ---------------------------------------------------------------------------------------------------------------
def split_transcript(transcript: str) -> tuple[str, str]:
    """(dialogue before the final assistant turn, that turn). A single-turn dialogue's prompt is the human's text;
    longer ones keep their Human:/Assistant: labels so the model sees the conversation so far."""
    cut = transcript.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"transcript has no {ASSISTANT.strip()!r} turn: {transcript[:80]!r}")
    history, response = transcript[:cut], transcript[cut + len(ASSISTANT) :]
    if history.count(HUMAN) == 1 and history.strip().startswith(HUMAN.strip()):
        history = history.split(HUMAN, 1)[1]
    return history.strip(), response.strip()


def read_hh_rlhf(dataset: str, path: str | None, limits: tuple[int, int]) -> Splits:
    def pairs(split: str) -> list[Pair]:
        rows = read_split(dataset, path, split, schemas.SPLIT_COLUMNS["hh_rlhf"][split])
        items: list[Pair | str] = []
        for r in rows:
            prompt, chosen = split_transcript(r["chosen"])
            other, rejected = split_transcript(r["rejected"])
            # both transcripts must share the dialogue; otherwise the pair compares answers to different questions
            items.append(Pair(prompt, chosen, rejected, gold_margin=None) if other == prompt else "different prompts")

        def problem(p: Pair | str) -> str | None:
            return p if isinstance(p, str) else text_problem(p.prompt, [p.chosen, p.rejected], *limits)

        return keep_valid(items, problem, split)[0]

    train, test = pairs("train"), pairs("test")
    return Splits(
        [Example(p.prompt, p.chosen) for p in train], [Example(p.prompt, p.chosen) for p in test], train, test
    )


# ---------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------
READERS = {"ultrafeedback": read_ultrafeedback, "hh_rlhf": read_hh_rlhf}


def hub_data(
    kind: str,
    dataset: str,
    path: str | None = None,
    seed: int = 0,
    max_prompt_chars: int = 2000,
    max_response_chars: int = 4000,
    n_pretrain: int = 0,
    n_sft: int | None = None,
    n_sft_val: int | None = 500,
    n_pairs: int | None = None,
    n_pairs_val: int | None = 500,
    n_prompts: int | None = None,
    n_eval_prompts: int | None = 500,
) -> TaskData:
    """The task of hub dataset `kind` (ultrafeedback | hh_rlhf), read from `dataset` on the hub or from `path`.
    `n_*` take seeded subsets (None = all); prompts are the distinct prompts of the preference pairs."""
    if kind not in READERS:
        raise DataError(f"unknown hub dataset kind {kind!r}; known: {sorted(READERS)}")
    splits = READERS[kind](dataset, path, (max_prompt_chars, max_response_chars))
    sft_train = subsample(splits.sft_train, n_sft, seed)
    pairs_train = subsample(splits.pairs_train, n_pairs, seed)
    return TaskData(
        name=kind,
        pretrain=documents(sft_train, n_pretrain),
        sft_train=sft_train,
        sft_val=subsample(splits.sft_test, n_sft_val, seed),
        pairs_train=pairs_train,
        pairs_val=subsample(splits.pairs_test, n_pairs_val, seed),
        prompts_train=subsample(distinct(p.prompt for p in pairs_train), n_prompts, seed),
        prompts_eval=subsample(distinct(p.prompt for p in splits.pairs_test), n_eval_prompts, seed),
    )
