"""Reject bad input before any training: every check here runs in well under a second on the composed config.

Only the standard library and omegaconf are imported, so a typo costs the time of Hydra's start-up, not of loading
torch. Each failure is a `ConfigError` whose message starts with the offending key and says what is allowed.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from salsa.config import KL_ESTIMATORS, QUANT, SOUP_METHODS, STAGES
from salsa.data.benchmarks import BENCHMARKS
from salsa.data.schemas import SPLIT_COLUMNS, DataFileError, check_local_dataset
from salsa.errors import CheckpointError, ConfigError


# ---------------------------------------------------------------------------------------------------------------
# Small checks
# ---------------------------------------------------------------------------------------------------------------
def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key)


def _number(cfg: DictConfig, key: str) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(key, f"must be finite, got {value!r}")
    return value


def positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        if not _number(cfg, key) > 0:
            raise ConfigError(key, f"must be > 0, got {_get(cfg, key)!r}")


def non_negative(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        if not _number(cfg, key) >= 0:
            raise ConfigError(key, f"must be ≥ 0, got {_get(cfg, key)!r}")


def positive_int(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = _get(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(key, f"must be a whole number ≥ 1, got {value!r}")


def in_range(cfg: DictConfig, key: str, low: float, high: float) -> None:
    value = _number(cfg, key)
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high}, got {value!r}")


def one_of(cfg: DictConfig, key: str, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if _get(cfg, key) not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(map(str, allowed))}; got {_get(cfg, key)!r}")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints on disk
# ---------------------------------------------------------------------------------------------------------------
def check_safetensors_file(path: Path) -> None:
    """Read the header of a safetensors file and check that the file is as long as the header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, {8 + n + end} expected)")


def check_checkpoint_dir(path: Path, key: str = "model.name_or_path") -> None:
    """A local Hugging Face checkpoint: config.json and complete safetensors weights (pickle files are refused)."""
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ConfigError(key, f"{path} has no config.json (not a Hugging Face checkpoint directory)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (
            f" (found {', '.join(pickles)}: pickle weights are not loaded; convert them to safetensors)"
            if pickles
            else ""
        )
        raise ConfigError(key, f"{path} has no safetensors weights{hint}")
    for shard in shards:
        if not (path / shard).is_file():
            raise ConfigError(key, f"{path} lacks the shard {shard} named in its index")
        try:
            check_safetensors_file(path / shard)
        except CheckpointError as e:
            raise ConfigError(key, str(e)) from e


def check_model_source(name_or_path: str, key: str = "model.name_or_path") -> None:
    """A local checkpoint directory, or a hub id that is already in the local Hugging Face cache when offline."""
    path = Path(os.path.expanduser(name_or_path))
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()
    if looks_local:
        if not path.is_dir():
            raise ConfigError(key, f"{name_or_path} does not exist")
        check_checkpoint_dir(path, key)
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not isinstance(cached, str) and offline:
        raise ConfigError(
            key, f"{name_or_path} is neither a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        )


# ---------------------------------------------------------------------------------------------------------------
# The whole config
# ---------------------------------------------------------------------------------------------------------------
def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value a run would trip over."""
    one_of(cfg, "stage", STAGES)

    # the reference: which SFT ingredients it is made of, and where the policy starts
    ingredients = cfg.ref.ingredients
    if not ingredients or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ingredients):
        raise ConfigError("ref.ingredients", f"must list SFT ingredient indices (whole numbers ≥ 0), got {ingredients}")
    if len(set(ingredients)) != len(ingredients):
        raise ConfigError("ref.ingredients", f"lists an ingredient twice: {list(ingredients)}")
    if cfg.ref.get("soup") and len(ingredients) < 2:
        raise ConfigError("ref.ingredients", f"a soup needs at least 2 ingredients, got {list(ingredients)}")
    init = cfg.ref.policy_init
    if init != "ref" and (isinstance(init, bool) or not isinstance(init, int) or init < 0):
        raise ConfigError("ref.policy_init", f"must be 'ref' or an SFT ingredient index, got {init!r}")

    one_of(cfg, "soup.method", SOUP_METHODS)
    if cfg.soup.method == "weighted" and len(ingredients) > 1:
        weights = cfg.soup.weights
        if weights is None or len(weights) != len(ingredients):
            raise ConfigError("soup.weights", f"needs one weight per ingredient ({len(ingredients)}), got {weights}")
        if not all(isinstance(w, int | float) and math.isfinite(w) for w in weights) or not sum(weights) > 0:
            raise ConfigError("soup.weights", f"must be finite numbers with a positive sum, got {list(weights)}")

    task = cfg.data.get("task") or {}
    if task.get("kind") in SPLIT_COLUMNS and cfg.data.get("path"):
        try:
            check_local_dataset(task.kind, cfg.data.path)
        except DataFileError as e:
            raise ConfigError("data.path", str(e)) from e

    model = cfg.model
    if model.get("name_or_path"):
        check_model_source(str(model.name_or_path))
        if model.get("quant") is not None:
            one_of(cfg, "model.quant", QUANT)
    elif model.get("pretrain") is not None:
        positive_int(
            cfg,
            "model.pretrain.epochs",
            "model.pretrain.batch_size",
            "model.pretrain.max_length",
            "model.pretrain.ckpt_every",
        )
        positive(cfg, "model.pretrain.lr")
    if not isinstance(model.get("trust_remote_code", False), bool):
        raise ConfigError("model.trust_remote_code", f"must be true or false, got {model.trust_remote_code!r}")

    replicate = cfg.sft.get("replicate", 0)
    if isinstance(replicate, bool) or not isinstance(replicate, int) or replicate < 0:
        raise ConfigError("sft.replicate", f"must be a whole number ≥ 0, got {replicate!r}")
    for group in ("sft", "rm"):
        positive_int(
            cfg,
            f"{group}.epochs",
            f"{group}.batch_size",
            f"{group}.max_prompt_length",
            f"{group}.max_response_length",
            f"{group}.ckpt_every",
        )
        positive(cfg, f"{group}.lr")
        non_negative(cfg, f"{group}.weight_decay", f"{group}.warmup_steps")

    p = "ppo"
    positive_int(
        cfg,
        f"{p}.iterations",
        f"{p}.batch_size",
        f"{p}.num_minibatches",
        f"{p}.ppo_epochs",
        f"{p}.response_length",
        f"{p}.max_prompt_length",
        f"{p}.ckpt_every",
    )
    if cfg.ppo.batch_size % cfg.ppo.num_minibatches:
        raise ConfigError(
            f"{p}.num_minibatches", f"must divide ppo.batch_size ({cfg.ppo.batch_size}), got {cfg.ppo.num_minibatches}"
        )
    non_negative(cfg, f"{p}.kl_coef", f"{p}.weight_decay", f"{p}.vf_coef")
    positive(
        cfg, f"{p}.lr", f"{p}.temperature", f"{p}.clip", f"{p}.value_clip", f"{p}.max_grad_norm", f"{p}.kl_horizon"
    )
    in_range(cfg, f"{p}.gamma", 0.0, 1.0)
    in_range(cfg, f"{p}.lam", 0.0, 1.0)
    one_of(cfg, f"{p}.kl_estimator", KL_ESTIMATORS)
    if cfg.ppo.target_kl is not None:
        positive(cfg, f"{p}.target_kl")
    if cfg.ppo.missing_eos_penalty is not None:
        non_negative(cfg, f"{p}.missing_eos_penalty")

    positive_int(cfg, "eval.samples_per_prompt", "eval.batch_size", "eval.response_length", "eval.max_prompt_length")
    if cfg.eval.do_sample:
        positive(cfg, "eval.temperature")
    non_negative(cfg, "eval.tie_tolerance")
    if cfg.eval.get("export"):
        one_of(cfg, "eval.export", BENCHMARKS)
        questions = cfg.eval.answers.questions
        if not questions or not Path(str(questions)).is_file():
            raise ConfigError("eval.answers.questions", f"must be the benchmark's question.jsonl, got {questions}")
