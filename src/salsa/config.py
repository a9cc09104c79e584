"""Typed configs: one dataclass per config group, the values each setting allows, and each group's own checks.

`TrainConfig` is registered with Hydra's ConfigStore as `train_schema`, the first entry of `conf/train.yaml`'s
defaults, so every YAML file, experiment and command-line override merges into these types: a misspelled key or a
value of the wrong type fails while the config is composed, naming the key (`salsa.cli` turns that into one line).
`check()` methods hold the rules a type cannot say (ranges, cross-field constraints); `salsa.validate` runs them with
the checks that need the file system.

Only the standard library and omegaconf/hydra are imported here: a typo costs Hydra's start-up, not loading torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from salsa.errors import ConfigError

STAGES = ("base", "sft", "soup", "rm", "ppo", "eval")
SOUP_METHODS = ("uniform", "weighted", "greedy")
KL_ESTIMATORS = ("k1", "k3")
LOSS_AGGREGATIONS = ("token", "sequence")  # grpo.loss_aggregation (salsa.functional.aggregate_tokens)
DPO_LOSSES = ("sigmoid", "ipo")  # dpo.loss_type (salsa.functional.dpo_loss)
REF_UPDATES = ("frozen", "ema", "sync")  # ref.update (salsa.algorithms.reference)
QUANT = ("nf4", "none")  # model.quant of hub/local checkpoints (salsa.models.qlora)
FINETUNE = ("lora", "full")  # model.finetune of hub/local checkpoints
BENCHMARKS = ("mt_bench", "arena_hard")  # eval.export (salsa.data.benchmarks)
JUDGES = ("auto", "gold", "heldout_rm", "rm")  # eval.judge, besides a path (salsa.stages.evaluate)
ENGINES = ("hf", "hf_merged", "vllm")  # rollout.engine (salsa.models.engines)

# the repository this package runs from (src/salsa/config.py -> the repo root), unless SALSA_ROOT says otherwise
REPO_ROOT = Path(os.environ.get("SALSA_ROOT", Path(__file__).resolve().parents[2]))
CONF_DIR = REPO_ROOT / "conf"


# ---------------------------------------------------------------------------------------------------------------
# Checks of one value, named by its key
# ---------------------------------------------------------------------------------------------------------------
def number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(key, f"must be finite, got {value!r}")
    return value


def positive(key: str, value: Any) -> None:
    if not number(key, value) > 0:
        raise ConfigError(key, f"must be > 0, got {value!r}")


def non_negative(key: str, value: Any) -> None:
    if not number(key, value) >= 0:
        raise ConfigError(key, f"must be ≥ 0, got {value!r}")


def positive_int(key: str, value: Any, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(key, f"must be a whole number ≥ {least}, got {value!r}")


def in_range(key: str, value: Any, low: float, high: float) -> None:
    if not low <= number(key, value) <= high:
        raise ConfigError(key, f"must be between {low} and {high}, got {value!r}")


def full_finetune(model_cfg: Mapping[str, Any]) -> bool:
    """Whether every stage trains all the model's weights: the embedded model, and checkpoints under
    `model.finetune=full` (small ones such as SmolLM2-135M)."""
    return not model_cfg.get("name_or_path") or model_cfg.get("finetune") == "full"


def uses_adapters(model_cfg: Mapping[str, Any]) -> bool:
    """Checkpoints under `model.finetune=lora` (the default; every 2B+ preset): LoRA adapters on a frozen base."""
    return not full_finetune(model_cfg)


def one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")


class Group:
    """A group's typed config. `from_cfg(node)` converts a config node (unknown keys are an error, never dropped);
    `check(prefix)` raises ConfigError naming the first bad key (`prefix.field`)."""

    POSITIVE_INT: tuple[str, ...] = ()
    POSITIVE: tuple[str, ...] = ()
    NON_NEGATIVE: tuple[str, ...] = ()

    @classmethod
    def from_cfg(cls, node: Any) -> Any:
        return typed(node, cls)

    def check(self, prefix: str) -> None:
        for name in self.POSITIVE_INT:
            positive_int(f"{prefix}.{name}", getattr(self, name))
        for name in self.POSITIVE:
            positive(f"{prefix}.{name}", getattr(self, name))
        for name in self.NON_NEGATIVE:
            non_negative(f"{prefix}.{name}", getattr(self, name))


# ---------------------------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoraSettings(Group):
    r: int = 16  # rank of every adapter the pipeline trains (SFT ingredients, RM, the PPO policy's delta)
    alpha: float = 32  # scale = alpha / r
    dropout: float = 0.05  # LoRA dropout while training SFT and RM (PPO adapters use none)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def config(self, task_type: str | None = None, dropout: float | None = None, **extra: Any):
        """peft's LoraConfig with these settings (peft is imported here, on first use)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout if dropout is None else dropout,
            target_modules=list(self.target_modules),
            task_type=task_type,
            **extra,
        )


@dataclass
class PretrainConfig(Group):
    """How the base stage pretrains the embedded tiny model on the task's documents."""

    seed: int = 0
    epochs: int = 1
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_length: int = 64  # tokens per document
    val_fraction: float = 0.05  # documents held out for the base's held-out loss
    ckpt_every: int = 25  # optimizer steps per checkpoint

    POSITIVE_INT = ("epochs", "batch_size", "max_length", "ckpt_every")
    POSITIVE = ("lr",)


@dataclass
class ModelConfig(Group):
    """`model=`: the embedded tiny model (built and pretrained) or a hub/local checkpoint under (Q)LoRA."""

    name: str = "tiny"
    name_or_path: str | None = None  # None = build and pretrain the tiny model; a hub id or local dir = that model
    revision: str | None = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False
    quant: str | None = None  # nf4 (QLoRA) | none (bf16 weights); checkpoints only
    finetune: str = "lora"  # checkpoints: lora (adapters on a frozen base) | full (every weight, in float32)
    gguf: dict[str, str] | None = None  # {package, file}: a GGUF copy in a Python package, read when the hub is not
    gradient_checkpointing: bool = True  # checkpoints only
    lora: LoraSettings | None = None  # every adapter the pipeline trains on a checkpoint
    arch: dict[str, Any] = field(default_factory=dict)  # tiny: GemmaConfig fields; hub: its config.json (memory)
    pretrain: PretrainConfig | None = None  # tiny only

    def check(self, prefix: str) -> None:
        if self.name_or_path:
            if self.quant is not None:
                one_of(f"{prefix}.quant", self.quant, QUANT)
            one_of(f"{prefix}.finetune", self.finetune, FINETUNE)
            if self.finetune == "full" and self.quant == "nf4":
                raise ConfigError(
                    f"{prefix}.finetune", "full fine-tuning trains float weights: use model.quant=none, or "
                    "model.finetune=lora for QLoRA on the 4-bit base"
                )  # fmt: skip
            if self.gguf is not None and set(self.gguf) != {"package", "file"}:
                raise ConfigError(f"{prefix}.gguf", f"needs exactly the keys package and file, got {sorted(self.gguf)}")
        elif self.pretrain is not None:
            self.pretrain.check(f"{prefix}.pretrain")


@dataclass
class DataConfig(Group):
    """`data=`: the task. `task` is the keyword arguments of its builder (`_target_`)."""

    name: str = "synthetic"
    path: str | None = None  # hub datasets: a local directory with the splits' files instead of the hub
    task: dict[str, Any] = field(default_factory=dict)

    def check(self, prefix: str) -> None:
        """Every key of `task` is an argument of its builder (a typo would otherwise fail only when data loads)."""
        import importlib
        import inspect

        target = self.task.get("_target_")
        if not target:
            raise ConfigError(f"{prefix}.task._target_", "must name the function that builds the task")
        module, _, name = str(target).rpartition(".")
        try:
            builder = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{prefix}.task._target_", f"{target} cannot be imported ({e})") from e
        accepted = inspect.signature(builder).parameters
        for key in self.task:
            if not key.startswith("_") and key not in accepted:
                raise ConfigError(f"{prefix}.task.{key}", f"is not an argument of {target} ({', '.join(accepted)})")


@dataclass
class SFTConfig(Group):
    """`sft=`: the SFT ingredients. Ingredient i is trained with seed `seed + 1000·replicate + i`."""

    seed: int = 100
    replicate: int = 0  # an independent set of ingredients per replicate
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    attention_dropout: float = 0.1  # dropout is one of the seeds' sources of diversity (tiny model)
    max_prompt_length: int = 32
    max_response_length: int = 48
    ckpt_every: int = 25  # optimizer steps per checkpoint (a crash costs at most this many)

    POSITIVE_INT = ("epochs", "batch_size", "max_prompt_length", "max_response_length", "ckpt_every")
    POSITIVE = ("lr",)
    NON_NEGATIVE = ("weight_decay", "warmup_steps")

    def check(self, prefix: str) -> None:
        if isinstance(self.replicate, bool) or not isinstance(self.replicate, int) or self.replicate < 0:
            raise ConfigError(f"{prefix}.replicate", f"must be a whole number ≥ 0, got {self.replicate!r}")
        super().check(prefix)


@dataclass
class SoupConfig(Group):
    """`soup=`: how ingredients are averaged."""

    method: str = "uniform"  # uniform | weighted | greedy
    weights: list[float] | None = None  # weighted: one per ingredient of the reference, normalised to sum to 1

    def check(self, prefix: str, n_ingredients: int) -> None:
        one_of(f"{prefix}.method", self.method, SOUP_METHODS)
        if self.method == "weighted" and n_ingredients > 1:
            weights = self.weights
            if weights is None or len(weights) != n_ingredients:
                raise ConfigError(
                    f"{prefix}.weights", f"needs one weight per ingredient ({n_ingredients}), got {weights}"
                )
            if not all(math.isfinite(w) for w in weights) or not sum(weights) > 0:
                raise ConfigError(f"{prefix}.weights", f"must be finite numbers with a positive sum, got {weights}")


@dataclass
class RefConfig(Group):
    """`ref=`: the KL reference (one SFT ingredient, or the soup of several) and where the policy starts."""

    name: str = "soup3"
    soup: bool = True  # the reference is the soup of `ingredients` (at least 2)
    ingredients: list[int] = field(default_factory=lambda: [0, 1, 2])
    policy_init: Any = "ref"  # "ref" = the policy starts as the reference; an integer = that SFT ingredient
    # a reference that moves during training, starting at the model above: frozen | ema (after every optimizer step,
    # ref ← (1 − ema_rate)·ref + ema_rate·policy) | sync (every sync_every steps, ref ← (1 − sync_mix)·ref +
    # sync_mix·policy; WARP's and TR-DPO's anchors)
    update: str = "frozen"
    ema_rate: float = 0.01
    sync_every: int = 10
    sync_mix: float = 1.0

    def check(self, prefix: str) -> None:
        one_of(f"{prefix}.update", self.update, REF_UPDATES)
        in_range(f"{prefix}.ema_rate", self.ema_rate, 0.0, 1.0)
        in_range(f"{prefix}.sync_mix", self.sync_mix, 0.0, 1.0)
        positive_int(f"{prefix}.sync_every", self.sync_every)
        ingredients = self.ingredients
        if not ingredients or any(i < 0 for i in ingredients):
            raise ConfigError(
                f"{prefix}.ingredients", f"must list SFT ingredient indices (whole numbers ≥ 0), got {ingredients}"
            )
        if len(set(ingredients)) != len(ingredients):
            raise ConfigError(f"{prefix}.ingredients", f"lists an ingredient twice: {list(ingredients)}")
        if self.soup and len(ingredients) < 2:
            raise ConfigError(f"{prefix}.ingredients", f"a soup needs at least 2 ingredients, got {list(ingredients)}")
        if not self.soup and len(ingredients) != 1:
            raise ConfigError(f"{prefix}.soup", f"is false, so the reference is one ingredient; got {ingredients}")
        init = self.policy_init
        if init != "ref" and (isinstance(init, bool) or not isinstance(init, int) or init < 0):
            raise ConfigError(f"{prefix}.policy_init", f"must be 'ref' or an SFT ingredient index, got {init!r}")


@dataclass
class InitConfig(Group):
    """`init=`: where the policy starts, apart from the reference: `ref` = as the `ref=` choice says (its
    `policy_init`); otherwise one SFT ingredient or the soup of several, whatever the reference."""

    name: str = "ref"
    soup: bool = False  # the start is the soup of `ingredients` (at least 2)
    ingredients: list[int] = field(default_factory=list)

    def check(self, prefix: str) -> None:
        if self.name == "ref":
            if self.ingredients:
                raise ConfigError(f"{prefix}.ingredients", "must be empty for init=ref (the ref= choice decides)")
            return
        RefConfig(self.name, self.soup, list(self.ingredients)).check(prefix)


@dataclass
class RMConfig(Group):
    """`rm=`: the Bradley–Terry reward model (a scalar head on the base LM)."""

    seed: int = 0
    epochs: int = 1
    batch_size: int = 32  # pairs per step (chosen and rejected go through one forward pass)
    val_batch_size: int = 128
    lr: float = 1e-3
    head_lr: float | None = None  # the scalar head's own learning rate (None: lr)
    score: str = "last"  # last: the head at the last token | mean: averaged over the answer (full-weight models)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    center_coef: float = 0.01  # + center_coef · E[(r_c + r_r)²] keeps rewards centred at zero
    normalize: bool = True  # scale the head so scores have unit s.d. on the held-out pairs' answers
    max_prompt_length: int = 32
    max_response_length: int = 48
    ckpt_every: int = 25  # optimizer steps per checkpoint
    members: int = 1  # rm=soup: this many reward models (member i: seed rm.seed + 1000·i), averaged weight by weight

    POSITIVE_INT = ("epochs", "batch_size", "max_prompt_length", "max_response_length", "ckpt_every", "members")
    POSITIVE = ("lr",)
    NON_NEGATIVE = ("weight_decay", "warmup_steps")

    def check(self, prefix: str) -> None:
        super().check(prefix)
        one_of(f"{prefix}.score", self.score, ("last", "mean"))
        if self.head_lr is not None:
            positive(f"{prefix}.head_lr", self.head_lr)


@dataclass
class PPOConfig(Group):
    """`ppo=`: PPO against the reference (`salsa.algorithms.ppo`)."""

    iterations: int = 30  # PPO iterations (rollout + update), one Lightning epoch each
    batch_size: int = 64  # prompts per rollout, per process
    num_minibatches: int = 2  # minibatches per PPO epoch; must divide batch_size
    ppo_epochs: int = 2  # passes over each rollout
    lr: float = 1e-4  # AdamW learning rate for policy and value
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping
    response_length: int = 40  # max new tokens per response
    max_prompt_length: int = 32  # longer prompts keep their last tokens
    temperature: float = 1.0  # sampling temperature; the policy optimised is π at this temperature
    kl_coef: float = 0.05  # β of the per-token KL penalty (initial value when target_kl is set)
    kl_estimator: str = "k1"  # k1 = log π − log π_ref (unbiased); k3 = (r − 1) − log r (≥ 0, lower variance)
    target_kl: float | None = None  # sequence KL the adaptive controller aims for; None = fixed kl_coef
    kl_horizon: float = 10000.0  # adaptive controller horizon, in samples
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE λ
    clip: float = 0.2  # policy ratio clip ε
    value_clip: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1  # weight of the value loss
    whiten_rewards: bool = False  # whiten shaped rewards before GAE
    missing_eos_penalty: float | None = None  # subtracted from the score of responses that never end
    seed: int = 0  # prompt order, sampling and minibatch order
    ckpt_every: int = 5  # iterations per checkpoint (a crash costs at most this many)
    merge_start: bool = True  # model.quant=none: fold the policy's start into the base's weights (fewer adapters)
    compile: bool = False  # torch.compile the four models' decoders for scoring and the update (full weights only)
    compile_sampler: bool = False  # sample with a static KV cache and a compiled decode step (docs: Performance)

    POSITIVE_INT = (
        "iterations", "batch_size", "num_minibatches", "ppo_epochs", "response_length", "max_prompt_length",
        "ckpt_every",
    )  # fmt: skip
    NON_NEGATIVE = ("kl_coef", "weight_decay", "vf_coef")
    POSITIVE = ("lr", "temperature", "clip", "value_clip", "max_grad_norm", "kl_horizon")

    def check(self, prefix: str) -> None:
        positive_int(f"{prefix}.batch_size", self.batch_size)
        positive_int(f"{prefix}.num_minibatches", self.num_minibatches)
        if self.batch_size % self.num_minibatches:
            raise ConfigError(
                f"{prefix}.num_minibatches",
                f"must divide {prefix}.batch_size ({self.batch_size}), got {self.num_minibatches}",
            )
        super().check(prefix)
        in_range(f"{prefix}.gamma", self.gamma, 0.0, 1.0)
        in_range(f"{prefix}.lam", self.lam, 0.0, 1.0)
        one_of(f"{prefix}.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.target_kl is not None:
            positive(f"{prefix}.target_kl", self.target_kl)
        if self.missing_eos_penalty is not None:
            non_negative(f"{prefix}.missing_eos_penalty", self.missing_eos_penalty)


@dataclass
class GroupConfig(Group):
    """What GRPO and RLOO share: k answers sampled per prompt, and a clipped policy-gradient update without a value
    model. The update's settings are PPO's, so the three algorithms do the same optimisation work per sample."""

    iterations: int = 30  # rollout + update rounds, one Lightning epoch each
    batch_size: int = 16  # prompts per rollout, per process (× group_size answers: 64 samples, as PPO's 64 prompts)
    group_size: int = 4  # k answers sampled per prompt
    num_minibatches: int = 2  # minibatches per epoch over the batch_size × group_size answers; must divide them
    epochs: int = 2  # passes over each rollout
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping
    response_length: int = 40  # max new tokens per answer
    max_prompt_length: int = 32  # longer prompts keep their last tokens
    temperature: float = 1.0  # sampling temperature; the policy optimised is π at this temperature
    kl_coef: float = 0.05  # β of the KL to the reference
    clip: float = 0.2  # policy ratio clip ε
    missing_eos_penalty: float | None = None  # subtracted from the score of answers that never end
    seed: int = 0  # prompt order, sampling and minibatch order
    ckpt_every: int = 5  # iterations per checkpoint (a crash costs at most this many)
    merge_start: bool = True  # model.quant=none: fold the policy's start into the base's weights (fewer adapters)
    compile_sampler: bool = False  # sample with a static KV cache and a compiled decode step (docs: Performance)

    POSITIVE_INT = (
        "iterations", "batch_size", "num_minibatches", "epochs", "response_length", "max_prompt_length", "ckpt_every",
    )  # fmt: skip
    NON_NEGATIVE = ("kl_coef", "weight_decay")
    POSITIVE = ("lr", "temperature", "clip", "max_grad_norm")

    def check(self, prefix: str) -> None:
        super().check(prefix)
        positive_int(f"{prefix}.group_size", self.group_size, least=2)  # a baseline needs the other answers
        samples = self.batch_size * self.group_size
        if samples % self.num_minibatches:
            raise ConfigError(
                f"{prefix}.num_minibatches",
                f"must divide the {samples} answers of a rollout ({prefix}.batch_size × {prefix}.group_size), "
                f"got {self.num_minibatches}",
            )
        if self.missing_eos_penalty is not None:
            non_negative(f"{prefix}.missing_eos_penalty", self.missing_eos_penalty)


@dataclass
class GRPOConfig(GroupConfig):
    """`grpo=`: GRPO against the reference (`salsa.algorithms.grpo`): group-normalised advantages, KL (k3) in the
    loss."""

    scale_rewards: bool = True  # divide by the group's standard deviation (false: Dr. GRPO's plain difference)
    loss_aggregation: str = "token"  # token = mean over all answer tokens of the batch; sequence = per answer first

    def check(self, prefix: str) -> None:
        super().check(prefix)
        one_of(f"{prefix}.loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)


@dataclass
class RLOOConfig(GroupConfig):
    """`rloo=`: RLOO against the reference (`salsa.algorithms.rloo`): leave-one-out baseline, KL (k1, summed over
    the answer) in the reward."""

    normalize_advantages: bool = False  # whiten the advantages over the batch


@dataclass
class DPOConfig(Group):
    """`dpo=`: DPO (or IPO) on the preference pairs against the reference (`salsa.algorithms.dpo`)."""

    beta: float = 0.1  # β: strength of the implicit KL to the reference
    loss_type: str = "sigmoid"  # sigmoid = DPO; ipo = IPO's squared loss
    epochs: int = 1  # passes over the training pairs
    batch_size: int = 32  # pairs per step, split over the processes (chosen and rejected: one forward pass)
    lr: float = 1e-4  # AdamW learning rate, warmed up then cosine-decayed
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0  # gradient clipping
    max_prompt_length: int = 32  # longer prompts keep their last tokens
    max_response_length: int = 48
    reference_batch_size: int = 64  # pairs scored together when the reference's log-probabilities are computed
    seed: int = 0  # pair order
    ckpt_every: int = 25  # optimizer steps per checkpoint

    POSITIVE_INT = (
        "epochs", "batch_size", "max_prompt_length", "max_response_length", "reference_batch_size", "ckpt_every",
    )  # fmt: skip
    POSITIVE = ("beta", "lr", "max_grad_norm")
    NON_NEGATIVE = ("weight_decay", "warmup_steps")

    def check(self, prefix: str) -> None:
        super().check(prefix)
        one_of(f"{prefix}.loss_type", self.loss_type, DPO_LOSSES)


@dataclass
class AnswersConfig(Group):
    """The export's settings (`salsa.stages.export`)."""

    questions: str | None = None  # the benchmark's question.jsonl, a local path
    model_id: str = "salsa"
    max_new_tokens: int = 1024
    temperature: float = 0.0  # MT-Bench categories use FastChat's per-category temperatures instead
    batch_size: int = 4  # answers generated together


@dataclass
class EvalConfig(Group):
    """`eval=`: held-out evaluation; every model answers with the same sampling seed."""

    seed: int = 1234
    samples_per_prompt: int = 2
    do_sample: bool = True
    temperature: float = 1.0
    batch_size: int = 200
    response_length: int = 40
    max_prompt_length: int = 32
    tie_tolerance: float = 1e-6
    compile_sampler: bool = False  # sample with a static KV cache and a compiled decode step (docs: Performance)
    # who judges the win rates: auto = gold on the embedded task, heldout_rm on hub data; gold; heldout_rm = a second
    # reward model trained (seed rm.seed + 1) on `judge_share` of the preference pairs, which the policy's reward
    # model never sees; rm = the policy's own reward model (not independent: it rewards the policy's hacks); or a path
    # to a local sequence-classification reward model (with its tokenizer), which reads the answers' text
    judge: str = "auto"
    judge_share: float = 0.5  # heldout_rm: the share of the training pairs kept for the judge
    export: str | None = None  # mt_bench | arena_hard: also write the policy's answers for that benchmark's judge
    answers: AnswersConfig = field(default_factory=AnswersConfig)

    POSITIVE_INT = ("samples_per_prompt", "batch_size", "response_length", "max_prompt_length")
    NON_NEGATIVE = ("tie_tolerance",)

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.judge not in JUDGES and not Path(os.path.expanduser(self.judge)).is_dir():
            raise ConfigError(
                f"{prefix}.judge",
                f"must be one of {', '.join(JUDGES)} or a local reward model directory; got {self.judge!r}",
            )
        if not 0 < self.judge_share < 1:
            raise ConfigError(f"{prefix}.judge_share", f"must be between 0 and 1 (exclusive), got {self.judge_share!r}")
        if self.do_sample:
            positive(f"{prefix}.temperature", self.temperature)
        if self.export:
            one_of(f"{prefix}.export", self.export, BENCHMARKS)
            questions = self.answers.questions
            if not questions or not Path(str(questions)).is_file():
                raise ConfigError(
                    f"{prefix}.answers.questions", f"must be the benchmark's question.jsonl, got {questions}"
                )


@dataclass
class RolloutConfig(Group):
    """`rollout=`: what samples the online algorithms' rollouts and the evaluation's answers
    (`salsa.models.engines`). `hf` samples with the training model; `vllm` with a vLLM engine in the same process,
    weights pushed before every rollout, behaviour log-probs recomputed by the training model (exact PPO)."""

    engine: str = "hf"  # hf | hf_merged (a plain merged copy samples; bf16 on CUDA) | vllm
    # vllm: weight the policy loss of each token by min(π_trainer/π_engine, tis_cap), the truncated importance
    # correction of the engine's sampling distribution against the training model's; null = off (the engine's
    # samples are taken as the training model's, and the gap is only logged)
    tis_cap: float | None = None
    gpu_memory_utilization: float = 0.3  # vllm on CUDA: the device share its weights and KV cache may take
    sleep: bool = True  # vllm on CUDA: free its memory during the update (vLLM's sleep mode)
    kv_cache_gib: int = 1  # vllm on CPU: GiB of RAM for its KV cache (VLLM_CPU_KVCACHE_SPACE, whole GiB)
    enforce_eager: bool | None = None  # vllm: no compiled graphs; null = eager on CPU, CUDA graphs on GPU

    def check(self, prefix: str) -> None:
        one_of(f"{prefix}.engine", self.engine, ENGINES)
        if self.tis_cap is not None and not number(f"{prefix}.tis_cap", self.tis_cap) >= 1:
            raise ConfigError(f"{prefix}.tis_cap", f"must be ≥ 1 (or null), got {self.tis_cap!r}")
        if not 0 < number(f"{prefix}.gpu_memory_utilization", self.gpu_memory_utilization) <= 1:
            raise ConfigError(
                f"{prefix}.gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        positive_int(f"{prefix}.kv_cache_gib", self.kv_cache_gib)

    def key(self) -> dict[str, Any]:
        """What enters a stage's cache key: nothing under `hf` (keys stay what they were before engines existed);
        under another engine, the settings that change what is sampled or how the update weighs it."""
        if self.engine == "hf":
            return {}
        return {"rollout": {"engine": self.engine, "tis_cap": self.tis_cap}}


@dataclass
class AlgoConfig(Group):
    """`algo=`: the policy-optimisation stage (`salsa.algorithms.ALGORITHMS`); its settings are its own group."""

    name: str = "ppo"

    def check(self, prefix: str) -> None:
        from salsa.algorithms import ALGORITHMS

        one_of(f"{prefix}.name", self.name, tuple(ALGORITHMS))


@dataclass
class LandscapeConfig(Group):
    """`python src/landscape.py`: the grid over the plane through three SFT ingredients (`salsa.stages.landscape`)."""

    ingredients: list[int] = field(default_factory=lambda: [0, 1, 2])  # θ0, θ1, θ2: SFT ingredients spanning it
    a_min: float = -0.5  # grid range along θ1 − θ0
    a_max: float = 1.5
    b_min: float = -0.5  # grid range along θ2 − θ0
    b_max: float = 1.5
    steps: int = 9  # grid points per axis
    n_prompts: int = 64  # held-out prompts every grid point answers (eval.samples_per_prompt times each)

    POSITIVE_INT = ("n_prompts",)

    def check(self, prefix: str) -> None:
        ingredients = list(self.ingredients)
        if len(ingredients) != 3 or len(set(ingredients)) != 3 or not all(i >= 0 for i in ingredients):
            raise ConfigError(f"{prefix}.ingredients", f"must name 3 different SFT ingredients, got {ingredients}")
        super().check(prefix)
        positive_int(f"{prefix}.steps", self.steps, least=2)
        for axis in ("a", "b"):
            lo, hi = getattr(self, f"{axis}_min"), getattr(self, f"{axis}_max")
            if not lo < hi:
                raise ConfigError(
                    f"{prefix}.{axis}_min", f"must be a number below {prefix}.{axis}_max, got {lo!r}, {hi!r}"
                )


@dataclass
class LoggerConfig(Group):
    """`logger=`: experiment tracking (mlflow | none)."""

    name: str = "mlflow"
    experiment_name: str | None = None
    tracking_uri: str | None = None  # sqlite:///<log_dir>/mlflow.db (MLflow 3 refuses the plain file store)
    artifact_location: str | None = None


@dataclass
class ExtrasConfig(Group):
    progress_bar: bool = True  # rich progress bars (drawn only when stdout is a terminal)
    print_config: bool = False
    torch_threads: int | None = None  # None = torch's default
    keep_rank_outputs: bool = False  # DDP: keep ranks 1..N-1's copies of each trained stage beside rank 0's
    traceback: bool = False  # show the traceback of errors that are normally one line (or SALSA_TRACEBACK=1)


@dataclass
class PathsConfig(Group):
    root_dir: str = "."
    log_dir: str = "logs"  # everything a run writes lives under it
    cache_dir: str = "logs/cache"  # the stage cache
    output_dir: str = "."  # the run's directory (Hydra's)


@dataclass
class TrainConfig(Group):
    """The root of `conf/train.yaml` (and of `conf/landscape.yaml`, which adds `landscape`)."""

    task_name: str = "salsa"
    stage: str = "eval"  # the last stage to run
    seed: int = 0
    optimized_metric: str | None = None  # the key of results.json a hyperparameter sweeper maximises
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    soup: SoupConfig = field(default_factory=SoupConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    init: InitConfig = field(default_factory=InitConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # pytorch_lightning.Trainer's arguments
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    extras: ExtrasConfig = field(default_factory=ExtrasConfig)
    landscape: LandscapeConfig | None = None


def rollout_config(cfg: Any) -> RolloutConfig:
    """The run's `rollout=` group (the default `hf` for a config composed without one)."""
    node = cfg.get("rollout") if hasattr(cfg, "get") else None
    return RolloutConfig.from_cfg(node) if node is not None else RolloutConfig()


# groups whose `check` takes only its key; the soup's also needs the reference's size (see `check_groups`)
CHECKED_GROUPS = (
    "model", "data", "sft", "ref", "init", "rm", "algo", "ppo", "dpo", "grpo", "rloo", "eval", "rollout",
)  # fmt: skip


def typed(node: Any, cls: type) -> Any:
    """A config node (or a plain mapping) as its dataclass, interpolations resolved; a key the type lacks or a
    value of the wrong type is a ConfigError naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(node, cls):
        return node
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
    except OmegaConfBaseException as e:
        prefix = node._get_full_key(None) if OmegaConf.is_config(node) else ""
        key = ".".join(k for k in (prefix, str(getattr(e, "full_key", "") or "")) if k)
        raise ConfigError(key or cls.__name__, str(e).splitlines()[0]) from e


def check_groups(cfg: Any) -> None:
    """Each group's own checks, then the ones across groups; raises ConfigError naming the first bad key."""
    one_of("stage", cfg.stage, STAGES)
    types = {f.name: f.type for f in fields(TrainConfig)}
    for group in CHECKED_GROUPS:
        typed(cfg[group], _resolve_type(types[group])).check(group)
    typed(cfg.soup, SoupConfig).check("soup", len(cfg.ref.ingredients))
    init = cfg.init
    if init.soup and cfg.soup.method == "weighted" and len(init.ingredients) != len(cfg.ref.ingredients):
        raise ConfigError(
            "init",
            f"init={init.name} is a soup of {len(init.ingredients)} ingredients, and soup.weights gives one "
            f"weight per ingredient of the reference ({len(cfg.ref.ingredients)}): use soups of one size",
        )
    check_data_parallel(cfg)
    check_model_and_data(cfg)
    if cfg.get("landscape") is not None:
        typed(cfg.landscape, LandscapeConfig).check("landscape")


def strategy_name(trainer: Any) -> str:
    """The Trainer config's strategy by name: a Lightning name as given (`ddp`, `fsdp`, `deepspeed_stage_2`), `fsdp2`
    for Lightning's ModelParallelStrategy built from a `_target_` node (trainer=fsdp2), '' for none."""
    strategy = trainer.get("strategy")
    if not strategy:
        return ""
    if isinstance(strategy, str):
        return strategy
    target = str(strategy.get("_target_", "")) if hasattr(strategy, "get") else type(strategy).__name__
    return "fsdp2" if target.endswith("ModelParallelStrategy") else target


def world_size(trainer: Any) -> int | None:
    """Processes a data-parallel Trainer config runs (devices × nodes); 1 without a parallel strategy, None when
    only the machine can tell (`devices: auto`)."""
    strategy = strategy_name(trainer)
    if not any(s in strategy for s in ("ddp", "fsdp", "deepspeed")):
        return 1
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, list | tuple):
        return len(devices) * nodes
    return None


def check_data_parallel(cfg: Any) -> None:
    """Each of the world's processes takes an equal slice of every pretraining, SFT, RM and DPO batch (PPO, GRPO and
    RLOO batches are per process: any size runs)."""
    world = world_size(cfg.trainer)
    if not world or world == 1:
        return
    keys = ["sft.batch_size", "rm.batch_size"] + (["model.pretrain.batch_size"] if cfg.model.get("pretrain") else [])
    if cfg.algo.get("name") == "dpo" and cfg.stage in STAGES[STAGES.index("ppo") :]:
        keys.append("dpo.batch_size")
    from omegaconf import OmegaConf

    for key in keys:
        size = OmegaConf.select(cfg, key)
        if size % world:
            raise ConfigError(
                key,
                f"{size} does not split evenly over the {world} processes of trainer={strategy_name(cfg.trainer)}"
                f" (devices × num_nodes): use a multiple of {world}",
            )


# below these, a hub model's prompts and answers are cut almost everywhere (the tiny model's defaults are 32-48)
HUB_MIN_LENGTHS = {
    "sft.max_prompt_length": 64, "sft.max_response_length": 64, "rm.max_prompt_length": 64,
    "rm.max_response_length": 64, "ppo.max_prompt_length": 64, "ppo.response_length": 64,
}  # fmt: skip


def check_model_and_data(cfg: Any) -> None:
    """Combinations that cannot run: the tiny model needs the task's documents to pretrain on, and a task made from
    the base model's own answers (a `samples_per_prompt` key: `data=ifeval`) needs a pretrained instruct model."""
    task = cfg.data.get("task") or {}
    if not cfg.model.get("name_or_path") and "samples_per_prompt" in task:
        raise ConfigError(
            "model",
            f"data={cfg.data.name} makes its SFT data and preference pairs from a pretrained instruct model's own "
            f"answers to real-language prompts, and model={cfg.model.name} is built untrained, without a checkpoint: "
            "use model=smollm2 (runs on CPU), another checkpoint preset (model=gemma2b|llama2_7b|mistral7b) or "
            "model.name_or_path=/a/local/instruct/checkpoint",
        )
    if not cfg.model.get("name_or_path") and task.get("n_pretrain", 1) == 0:
        raise ConfigError(
            "model",
            f"model={cfg.model.name} is pretrained on the task's documents and data={cfg.data.name} has none "
            "(data.task.n_pretrain=0): use a checkpoint preset (model=smollm2|gemma2b|llama2_7b|mistral7b), "
            "model.name_or_path=/a/local/checkpoint, or data.task.n_pretrain=N demonstrations as documents",
        )


def scale_warnings(cfg: Any) -> list[str]:
    """Combinations that run but make little sense: a checkpoint trained with the tiny model's settings."""
    from omegaconf import OmegaConf

    if not cfg.model.get("name_or_path"):
        return []
    out = []
    if cfg.model.name == "tiny":
        out.append(
            f"model.name_or_path={cfg.model.name_or_path} under model=tiny keeps the tiny model's lengths, learning "
            "rates and batch sizes; for settings at a hub model's scale use a preset with your checkpoint, e.g. "
            f"model=gemma2b model.name_or_path={cfg.model.name_or_path}"
        )
    short = [
        f"{k}={OmegaConf.select(cfg, k)}" for k, least in HUB_MIN_LENGTHS.items() if OmegaConf.select(cfg, k) < least
    ]
    if short:
        out.append(f"{', '.join(short)}: this short, a hub model's prompts and answers are cut almost everywhere")
    sampled = OmegaConf.select(cfg, "data.task.max_new_tokens")
    if sampled is not None and OmegaConf.select(cfg, "data.task.samples_per_prompt") is not None:
        lengths = ("sft.max_response_length", "rm.max_response_length", "ppo.response_length")
        cut = [f"{k}={OmegaConf.select(cfg, k)}" for k in lengths if OmegaConf.select(cfg, k) < sampled]
        if cut:
            out.append(
                f"{', '.join(cut)} below data.task.max_new_tokens={sampled}: the base model's answers (SFT data, "
                f"pairs) are cut in training, and the policy's answers are cut before they end, which data="
                f"{cfg.data.name}'s gold reward scores 0; set them to data.task.max_new_tokens (experiment=smol_ifeval)"
            )
    return out


def _resolve_type(name: Any) -> type:
    return globals()[name] if isinstance(name, str) else name


def register() -> None:
    """Make `train_schema` (and the landscape's) known to Hydra's ConfigStore; idempotent."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
