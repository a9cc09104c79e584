"""Task data: what the stages train and judge on.

A task is a `TaskData`: plain documents for pretraining the tiny base model, SFT demonstrations, preference pairs,
prompts for PPO and for evaluation, and optionally a gold judge. `data=synthetic` builds one from the embedded task;
`salsa.data.hub` builds one from a hub preference dataset.
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
