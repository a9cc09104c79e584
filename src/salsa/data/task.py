"""Task data: what the stages train and judge on.

A task is a `TaskData`: plain documents for pretraining the tiny base model, SFT demonstrations, preference pairs,
prompts for PPO and for evaluation, and optionally a gold judge and task metrics. `data=synthetic` builds one from the
embedded task; `salsa.data.hub` builds one from a hub preference dataset; `salsa.data.ifeval` builds one whose SFT
data and preference pairs come from the base model's own answers (`SampleRequest`, completed by the samples stage,
`salsa.stages.samples`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from salsa.data.synthetic import Example, Pair, SyntheticTask, gold_reward


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
    # the task's own metrics of a model's answers (prompts, texts, ended) -> {name: value}, reported by evaluation
    metrics: Callable[[list[str], list[str], list[bool]], dict[str, float]] | None = None
    # SFT data and pairs still to be made from the base model's answers: the samples stage completes the task
    needs_samples: SampleRequest | None = None


# one answer of the base model: (text, ended, gold reward)
Answer = tuple[str, bool, float]


@dataclass(frozen=True)
class SampleRequest:
    """What a task needs from its base model before SFT (rejection sampling, `salsa.stages.samples`): `n[i]` answers
    to `prompts[i]`, sampled at `temperature` with at most `max_new_tokens` new tokens, `batch_size` answers at a
    time, seeded by `seed`; `complete(answers)` (answers[i]: the `Answer`s to prompts[i], each judged by the task's
    gold reward) returns the completed `TaskData`."""

    prompts: list[str]
    n: list[int]
    temperature: float
    max_new_tokens: int
    batch_size: int
    seed: int
    complete: Callable[[list[list[Answer]]], TaskData]


def synthetic_data(
    seed: int = 0,
    rater_temperature: float = 1.0,
    n_pretrain: int = 24000,
    n_sft: int = 4000,
    n_sft_val: int = 400,
    n_pairs: int = 3000,
    n_pairs_val: int = 500,
    n_prompts: int = 2000,
    n_eval_prompts: int = 200,
    pretrain_chat: float = 1.0,
) -> TaskData:
    """The embedded task (`salsa.data.synthetic`); `pretrain_chat` is the share of pretraining documents written as
    a prompt and its answer in the chat format (`SyntheticTask.pretrain_documents`)."""
    task = SyntheticTask(seed, rater_temperature)
    sft = task.sft_examples(n_sft + n_sft_val)
    return TaskData(
        name="synthetic",
        pretrain=task.pretrain_documents(n_pretrain, pretrain_chat),
        sft_train=sft[:n_sft],
        sft_val=sft[n_sft:],
        pairs_train=task.preference_pairs(n_pairs, "train"),
        pairs_val=task.preference_pairs(n_pairs_val, "val"),
        prompts_train=task.prompts(n_prompts, "train"),
        prompts_eval=task.prompts(n_eval_prompts, "eval"),
        judge=gold_reward,
    )


def judge_answers(judge: Callable[[str, str, bool], float], prompts, texts, ended) -> list[float]:
    """The gold judge's reward of each answer (`texts[i]` to `prompts[i]`, `ended[i]`: it closed with EOS)."""
    return [judge(p, t, bool(e)) for p, t, e in zip(prompts, texts, ended, strict=True)]
