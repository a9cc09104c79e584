"""Hand a finished pipeline's models to an external RL engine (OpenRLHF, verl) for runs past what this template does
well (7B+ full-parameter PPO with vLLM rollouts).

    python -m salsa.export_engine --cache logs/cache --soup KEY --rm KEY --out DIR [--dtype bf16|fp32] [--prompts N]
    python -m salsa.export_engine --cache logs/cache --ppo KEY --out DIR      # start, reference, RM and settings of
                                                                             # one PPO stage

writes into DIR:

- `policy_init/`: the policy's start, which is also its KL reference (SALSA's soup), as plain Hugging Face causal-LM
  weights in safetensors with its tokenizer. LoRA stages (hub models) are merged into the base loaded unquantised in
  the export's dtype: W ← W + B·A·scale, summed in float32 and rounded once.
- `reward_model/`: the reward model as a `*ForSequenceClassification` checkpoint (num_labels=1) with its trained
  scalar head `score`, the layout both engines read.
- `reference/` (only with `--reference`, or a PPO stage whose reference is not its start: `ref=other`, `init=`):
  the KL reference; the engines take the reference from the policy's start, so using it needs a patch.
- `prompts.jsonl` (`{"prompt": text}` per line) and `prompts.parquet` (verl's schema): the PPO training prompts.
- `launch.md`, `launch_openrlhf.sh`, `launch_verl.sh`: the launch lines, for the engine versions in `ENGINES`.
- `export.json`: the source stages, dtype, what each path is and the engine versions.

The exported configs set `attention_dropout` to 0 (SFT checkpoints carry 0.1; PPO's log-probabilities need it off,
as SALSA's own PPO loads them), and a tokenizer without a chat template gets SALSA's plain prompt format as one
(`{bos}{prompt}\\n\\n`), so that `apply_chat_template` in either engine builds the queries SALSA's PPO built.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salsa.errors import SalsaError
from salsa.infra.cache import MANIFEST

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
POLICY_STAGES = ("soup", "sft", "base", "ppo", "dpo", "grpo", "rloo")  # stages whose output is a causal LM
REWARD_STAGES = ("rm", "rm_soup")  # stages whose output is a reward model (scalar head)
# SALSA's prompt format for tokenizers without a chat template (`salsa.data.tokens._render`), as a chat template
PLAIN_TEMPLATE = "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}"
# the engine versions whose source the launch lines were written from (flags and config keys read there, not run)
ENGINES = {
    "openrlhf": {
        "version": "0.11.0",
        "source": "https://github.com/OpenRLHF/OpenRLHF tag v0.11.0 (commit 3c3be6234e0c): "
        "openrlhf/cli/train_ppo_ray.py, openrlhf/datasets/prompts_dataset.py, openrlhf/models/model.py",
    },
    "verl": {
        "version": "0.9.0",
        "source": "https://github.com/verl-project/verl tag v0.9.0 (commit 483b8a009ba3): "
        "verl/trainer/config/_generated_ppo_trainer.yaml, verl/utils/dataset/rl_dataset.py, "
        "verl/experimental/reward_loop/reward_loop.py, verl/workers/engine_workers.py",
    },
}


# what the export writes (export.json's `paths`); `reference` only for a reference other than the start
PATHS = {
    "policy_init": "the policy's start and its KL reference (SALSA's soup): AutoModelForCausalLM, safetensors",
    "reward_model": "the reward model: AutoModelForSequenceClassification (num_labels=1, head `score`), safetensors",
    "reference": "the KL reference, not the policy's start: the engines need a patch to use it (launch.md)",
    "prompts.jsonl": 'the PPO training prompts, {"prompt": text} per line (OpenRLHF: --data.input_key prompt)',
    "prompts.parquet": "the same prompts in verl's RL schema (prompt = one user turn, a model-style reward)",
    "launch.md": "the launch lines and what they do not carry over",
    "launch_openrlhf.sh": "the OpenRLHF launch line; KL_COEF in the environment overrides the run's",
    "launch_verl.sh": "the verl launch line; KL_COEF in the environment overrides the run's",
    "export.json": "this manifest",
}
TOKENIZER_NOTE = "pad token set (eos where there is none); SALSA's plain prompt format as chat template where none"


class ExportError(SalsaError, ValueError):
    """A stage, base or output directory that cannot be exported."""


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """A finished stage directory of the cache: `<cache>/<stage>/<key>/` with its manifest."""

    name: str
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def format(self) -> str | None:
        """`full` (a Hugging Face checkpoint), `lora` (a peft adapter on the base) or `hub` (a base stage's record)."""
        return self.manifest.get("format")

    @property
    def spec(self) -> dict[str, Any]:
        return self.manifest.get("spec") or {}


def find_stage(cache: Path, ref: str, flag: str) -> Stage:
    """The stage that `ref` names: a stage directory, or a key looked up as `<cache>/*/<key>/`."""
    path = Path(ref)
    if not path.is_dir():
        found = sorted(cache.glob(f"*/{ref}/{MANIFEST}")) if ref and "/" not in ref else []
        if not found:
            raise ExportError(f"{flag} {ref}: no such stage directory, and no stage {ref!r} in the cache {cache}")
        if len(found) > 1:
            raise ExportError(f"{flag} {ref}: several stages have this key: {[str(f.parent) for f in found]}")
        path = found[0].parent
    if not (path / MANIFEST).is_file():
        raise ExportError(f"{flag} {path}: not a finished stage directory (no {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text())
    path = path.resolve()
    return Stage(manifest.get("stage", path.parent.name), manifest.get("key", path.name), path, manifest)


def check_kind(stage: Stage, role: str, flag: str) -> None:
    """Refuse a stage that does not hold the model `role` (`policy` or `reward`) needs, in one line."""
    if role == "reward":
        if stage.name in POLICY_STAGES:
            raise ExportError(
                f"{flag} {stage.path}: a {stage.name} stage is a causal LM without a trained scalar head, not a "
                "reward model; pass an rm or rm_soup stage"
            )
        if stage.name not in REWARD_STAGES:
            raise ExportError(f"{flag} {stage.path}: a {stage.name} stage holds no reward model")
        if stage.manifest.get("score", "last") != "last":
            raise ExportError(
                f"{flag} {stage.path}: this reward model was trained with rm.score={stage.manifest['score']} (its "
                "head averaged over the answer); OpenRLHF and verl read a reward model's last token, so they would "
                "score it wrongly. Export a reward model trained with rm.score=last"
            )
    else:
        if stage.name in REWARD_STAGES:
            raise ExportError(f"{flag} {stage.path}: a {stage.name} stage is a reward model, not a causal LM")
        if stage.name not in POLICY_STAGES:
            raise ExportError(f"{flag} {stage.path}: a {stage.name} stage holds no model")
    if stage.format == "hub":
        raise ExportError(
            f"{flag} {stage.path}: this base stage only records the hub model {stage.manifest.get('name_or_path')}; "
            "give the engine that checkpoint itself"
        )
    if stage.format not in ("full", "lora"):
        raise ExportError(f"{flag} {stage.path}: unknown stage format {stage.format!r} (expected full or lora)")


@dataclass
class Base:
    """The checkpoint a LoRA stage's adapter sits on."""

    name_or_path: str
    revision: str | None = None
    pipeline_quant: str | None = None  # how the pipeline loaded it (nf4: adapters were trained on 4-bit weights)


def base_of(cache: Path, stage: Stage, override: str | None) -> Base:
    """A LoRA stage's base: `--base` when given, else the base stage's record, else the adapter's own config."""
    record = cache / "base" / str(stage.manifest.get("base")) / MANIFEST
    info = json.loads(record.read_text()) if stage.manifest.get("base") and record.is_file() else {}
    if override:
        return Base(override, None, info.get("quant"))
    if info.get("name_or_path"):
        return Base(info["name_or_path"], info.get("revision"), info.get("quant"))
    adapter = stage.path / "adapter_config.json"
    name = json.loads(adapter.read_text()).get("base_model_name_or_path") if adapter.is_file() else None
    if not name:
        raise ExportError(f"{stage.path}: cannot tell the base of this adapter; pass --base DIR")
    return Base(name)


def check_unquantised(base: Base) -> None:
    """Refuse a base whose checkpoint holds only quantised weights: a merge needs the plain ones."""
    from transformers import AutoConfig

    name = base.name_or_path
    if (os.path.isabs(name) or name.startswith(".")) and not Path(name).is_dir():
        raise ExportError(f"base {name}: no such directory; pass --base DIR, a local copy of the base")
    try:
        config = AutoConfig.from_pretrained(base.name_or_path, revision=base.revision)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"base {base.name_or_path}: cannot read its config ({first}); pass --base DIR") from e
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", quant)
        raise ExportError(
            f"base {base.name_or_path} holds only quantised weights ({method}); the export merges into unquantised "
            "weights: pass --base DIR, a local copy of the unquantised checkpoint"
        )


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def no_dropout_kwargs(path: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """`attention_dropout=0.0` where the checkpoint's config has that field (SFT checkpoints carry 0.1, which would
    make an engine's PPO log-probabilities noisy), else nothing."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), revision=revision)
    return {"attention_dropout": 0.0} if "attention_dropout" in config.to_dict() else {}


def merge_lora(peft_model) -> nn.Module:
    """The plain model of a peft model: each LoRA layer's delta folded into its base weight, W ← W + B·A·scale,
    summed in float32 and rounded once to the weight's dtype; a reward model keeps its trained `score` head."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            for name in list(module.lora_A):
                delta = module.get_delta_weight(name).float()
                weight.data = (weight.data.float() + delta).to(weight.dtype)
    return peft_model.unload()  # the LoRA layers' base layers, the modules to save (the head) swapped in


def load_model(cache: Path, stage: Stage, dtype: torch.dtype, reward: bool, base: str | None = None) -> nn.Module:
    """A stage's model in `dtype` as a plain Hugging Face model: loaded as it is (`full`), or merged onto the base
    loaded unquantised (`lora`). `reward`: a one-output `*ForSequenceClassification` model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"num_labels": 1} if reward else {}
    if stage.format == "full":
        model = cls.from_pretrained(
            str(stage.path), dtype=dtype, use_safetensors=True, **no_dropout_kwargs(stage.path), **kwargs
        )
        return model.eval()
    from peft import PeftModel

    b = base_of(cache, stage, base)
    model = cls.from_pretrained(
        b.name_or_path, revision=b.revision, dtype=dtype, use_safetensors=True,
        **no_dropout_kwargs(b.name_or_path, b.revision), **kwargs,
    )  # fmt: skip
    merged = merge_lora(PeftModel.from_pretrained(model, str(stage.path)))
    return merged.to(dtype).eval()


def check_loadable(cache: Path, stage: Stage, reward: bool, base: str | None, flag: str) -> None:
    """Before anything is written: a LoRA stage's base must have unquantised weights, and a LoRA reward model must
    hold its trained `score` head."""
    if stage.format != "lora":
        return
    from safetensors import safe_open

    adapter = stage.path / "adapter_model.safetensors"
    if not adapter.is_file():
        raise ExportError(f"{flag} {stage.path}: a lora stage without adapter_model.safetensors")
    if reward:
        try:
            with safe_open(str(adapter), "pt") as f:
                names = list(f.keys())  # noqa: SIM118 (safe_open is no dict)
        except Exception as e:  # truncated or corrupt file
            raise ExportError(f"{flag} {adapter}: unreadable safetensors file ({e})") from e
        if not any(k.endswith("score.weight") for k in names):
            raise ExportError(f"{flag} {stage.path}: the adapter has no trained 'score' head")
    check_unquantised(base_of(cache, stage, base))


def export_tokenizer(cache: Path, stage: Stage, base: str | None):
    """The stage's tokenizer (its base's when the stage has none), with a pad token, and SALSA's plain prompt format
    as its chat template when it has none."""
    from salsa.models.hf import load_tokenizer

    try:
        tok = load_tokenizer(stage.path)
    except (OSError, ValueError):
        if stage.format != "lora":
            raise ExportError(f"{stage.path}: no tokenizer files") from None
        b = base_of(cache, stage, base)
        tok = load_tokenizer(b.name_or_path)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = PLAIN_TEMPLATE
    return tok


def save_model(model: nn.Module, tok, out: Path, reward: bool) -> None:
    """safetensors weights + config + tokenizer; a reward model's config names its pad token (batches are padded)."""
    if reward:
        model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------
def data_config(stages: Sequence[Stage]) -> tuple[dict[str, Any], Stage]:
    """The task config (`data`) the pipeline ran with, from the first of `stages` whose key holds it."""
    for s in stages:
        data = s.spec.get("data")
        if isinstance(data, dict) and isinstance(data.get("task"), dict):
            return data, s
    raise ExportError(f"no data config in the manifests of {[str(s.path) for s in stages]}; cannot write prompts")


def task_prompts(data: dict[str, Any]) -> list[str]:
    """The PPO training prompts of the task (`TaskData.prompts_train`), built as the pipeline builds its task."""
    import hydra

    return list(hydra.utils.instantiate(data["task"], _convert_="all").prompts_train)


def write_prompts(prompts: Sequence[str], out: Path, source: str) -> list[str]:
    """`prompts.jsonl` ({"prompt": text} per line: OpenRLHF's `--data.input_key prompt`) and `prompts.parquet`
    (verl's RL schema: the prompt as one user turn, a model-style reward). Returns the files written."""
    import pandas as pd

    with open(out / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}, ensure_ascii=False) + "\n")
    rows = [
        {
            "data_source": source, "prompt": [{"role": "user", "content": p}], "ability": "alignment",
            "reward_model": {"style": "model", "ground_truth": ""}, "extra_info": {"split": "train", "index": i},
        }
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    pd.DataFrame(rows).to_parquet(out / "prompts.parquet")
    return ["prompts.jsonl", "prompts.parquet"]


def query_lengths(tok, prompts: Sequence[str]) -> list[int]:
    """Token counts of the queries an engine builds: the chat template rendered to text, tokenized without added
    special tokens (OpenRLHF's way)."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]  # fmt: skip
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


# ---------------------------------------------------------------------------------------------------------------
# Launch lines
# ---------------------------------------------------------------------------------------------------------------
PPO_KEYS = ("kl_coef", "kl_estimator", "target_kl", "kl_horizon", "gamma", "lam", "clip", "value_clip", "temperature",
            "max_prompt_length", "response_length")  # fmt: skip
# (engine flag or config key, SALSA's `ppo.*` field) of the settings that mean the same in both
OPENRLHF_SETTINGS = (
    ("--algo.advantage.gamma", "gamma"),
    ("--algo.advantage.lambd", "lam"),
    ("--actor.eps_clip", "clip"),
    ("--critic.value_clip", "value_clip"),
    ("--rollout.temperature", "temperature"),
    ("--rollout.max_new_tokens", "response_length"),
)
VERL_SETTINGS = (
    ("algorithm.gamma", "gamma"),
    ("algorithm.lam", "lam"),
    ("actor_rollout_ref.actor.clip_ratio", "clip"),
    ("critic.cliprange_value", "value_clip"),
    ("actor_rollout_ref.rollout.temperature", "temperature"),
    ("data.max_prompt_length", "max_prompt_length"),
    ("data.max_response_length", "response_length"),
)


def ppo_settings(stage: Stage | None, kl_coef: float | None) -> dict[str, Any]:
    """The PPO settings the launch lines carry over: those of the PPO stage (its key holds them), `--kl-coef` on top."""
    settings = {k: (stage.spec.get("ppo") or {}).get(k) for k in PPO_KEYS} if stage is not None else {}
    settings = {k: v for k, v in settings.items() if v is not None}
    if kl_coef is not None:
        settings["kl_coef"] = kl_coef
    return settings


def openrlhf_args(out: Path, s: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(flag, value) pairs of `python -m openrlhf.cli.train_ppo_ray` (OpenRLHF 0.11.0's dotted flags); value None
    for a switch. The reference is the actor's start there (`--actor.model_name_or_path`), and the critic starts as
    the reward model when `--critic.model_name_or_path` is not given: SALSA's setting."""
    args: list[tuple[str, str | None]] = [
        ("--actor.model_name_or_path", str(out / "policy_init")),
        ("--reward.model_name_or_path", str(out / "reward_model")),
        ("--data.prompt_dataset", str(out / "prompts.jsonl")),
        ("--data.input_key", "prompt"),
        ("--data.apply_chat_template", None),
        ("--algo.advantage.estimator", "gae"),
        ("--algo.kl.init_coef", "${KL_COEF}"),
        ("--ds.param_dtype", "bf16"),
        ("--ckpt.output_dir", str(out / "openrlhf_output")),
        ("--ckpt.save_hf", None),
    ]
    if "kl_estimator" in s:
        args.append(("--algo.kl.estimator", s["kl_estimator"]))
    if s.get("target_kl") is not None:
        args += [("--algo.kl.target", str(s["target_kl"])), ("--algo.kl.horizon", str(s.get("kl_horizon", 10000)))]
    for flag, key in OPENRLHF_SETTINGS:
        if key in s:
            args.append((flag, str(s[key])))
    if "max_prompt_length" in s and "response_length" in s:
        args.append(("--data.max_len", str(s["max_prompt_length"] + s["response_length"])))
    return args


def verl_args(out: Path, s: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(key, value) overrides of `python -m verl.trainer.main_ppo` (verl 0.9.0's config). KL in the reward, per
    token (`algorithm.use_kl_in_reward`), as SALSA's PPO; the critic starts from the reward model, as SALSA's value."""
    estimator = {"k1": "kl", "k3": "low_var_kl"}
    args: list[tuple[str, str | None]] = [
        ("algorithm.adv_estimator", "gae"),
        ("algorithm.use_kl_in_reward", "True"),
        ("algorithm.kl_penalty", estimator.get(s.get("kl_estimator", "k1"), "kl")),
        ("algorithm.kl_ctrl.kl_coef", "${KL_COEF}"),
        ("actor_rollout_ref.actor.use_kl_loss", "False"),
        ("data.train_files", str(out / "prompts.parquet")),
        ("data.val_files", str(out / "prompts.parquet")),
        ("data.prompt_key", "prompt"),
        ("actor_rollout_ref.model.path", str(out / "policy_init")),
        ("actor_rollout_ref.rollout.name", "vllm"),
        ("critic.model.path", str(out / "reward_model")),
        ("reward.reward_model.enable", "True"),
        ("reward.reward_model.model_path", str(out / "reward_model")),
        ("reward.reward_model.rollout.name", "vllm"),
        ("trainer.val_before_train", "False"),
        ("trainer.test_freq", "-1"),
        ("trainer.logger", "[console]"),
    ]
    if s.get("target_kl") is not None:
        args += [("algorithm.kl_ctrl.type", "adaptive"), ("algorithm.kl_ctrl.target_kl", str(s["target_kl"])),
                 ("algorithm.kl_ctrl.horizon", str(s.get("kl_horizon", 10000)))]  # fmt: skip
    for key, name in VERL_SETTINGS:
        if name in s:
            args.append((key, str(s[name])))
    return args


def _quote(value: str) -> str:
    """A shell word; `${KL_COEF}` stays expandable."""
    return f'"{value}"' if value.startswith("${") else shlex.quote(value)


def command(program: str, args: Sequence[tuple[str, str | None]], style: str) -> str:
    """A multi-line shell command: `flag value` pairs (OpenRLHF) or `key=value` overrides (verl)."""
    parts = []
    for flag, value in args:
        if value is None:
            parts.append(flag)
        else:
            parts.append(f"{flag} {_quote(value)}" if style == "flags" else f"{flag}={_quote(value)}")
    return " \\\n    ".join([program, *parts])


def launch_script(cmd: str, kl_coef: float | None) -> str:
    """An executable launch script; KL_COEF from the environment, defaulting to the run's `ppo.kl_coef` if known."""
    kl = f"KL_COEF=${{KL_COEF:-{kl_coef}}}" if kl_coef is not None else (
        'KL_COEF=${KL_COEF:?"set KL_COEF, the KL coefficient of the run (ppo.kl_coef)"}'
    )  # fmt: skip
    head = "#!/usr/bin/env bash\n# written by python -m salsa.export_engine\nset -euo pipefail\n"
    return f'{head}{kl}\n{cmd} \\\n    "$@"\n'


def launch_md(openrlhf: str, verl: str, info: dict[str, Any]) -> str:
    """The launch lines with what they assume and what they do not carry over."""
    kl = info["ppo"].get("kl_coef")
    kl_line = f"`{kl}` (the run's `ppo.kl_coef`)" if kl is not None else "unknown: set `KL_COEF` (`ppo.kl_coef`)"
    stages = ", ".join(f"{name} = {src['stage']} {src['key']}" for name, src in info["sources"].items())
    lines = [
        "# Launching an external RL engine on this export",
        "",
        f"Written by `python -m salsa.export_engine` in {info['dtype']} from: {stages}.",
        f"KL coefficient: {kl_line}. The scripts take extra arguments (GPUs, batch sizes, vLLM engines) after theirs.",
        "",
        f"## OpenRLHF {ENGINES['openrlhf']['version']} (`launch_openrlhf.sh`)",
        "",
        f"Flags read in {ENGINES['openrlhf']['source']}; not run here.",
        "",
        "```bash",
        f"KL_COEF={kl if kl is not None else '<KL_COEF>'}",
        openrlhf,
        "```",
        "",
        "- The reference is the actor's start, `policy_init/` (SALSA's setting); with no `--critic.model_name_or_path`"
        " the critic starts as the reward model, as SALSA's value model does. `--ds.param_dtype` is bf16 or fp16.",
        "- Releases before 0.10.2 name the flags `--pretrain`, `--reward_pretrain`, `--prompt_data`, `--input_key`,"
        " `--apply_chat_template`, `--init_kl_coef`.",
        "",
        f"## verl {ENGINES['verl']['version']} (`launch_verl.sh`)",
        "",
        f"Config keys read in {ENGINES['verl']['source']}; not run here.",
        "",
        "```bash",
        f"KL_COEF={kl if kl is not None else '<KL_COEF>'}",
        verl,
        "```",
        "",
        "- The reward model is served by vLLM (`/classify`) on the conversation re-rendered with `reward_model/`'s"
        " chat template; SALSA scored prompt tokens + answer tokens + EOS. Check that the two agree for your"
        " tokenizer. verl builds the critic from `reward_model/` as a one-label token-classification model.",
        "- verl 0.9.0 no longer maps the older `reward_model.enable` / `reward_model.model.path` keys onto"
        " `reward.reward_model.*` (0.8 did).",
        "",
        "## What is not carried over",
        "",
        "- A reference that is not the policy's start (`ref=other`, `init=sft ref=soup3`, ...): both engines build the"
        " reference from the actor's path. OpenRLHF 0.11.0 needs a patch (train_ppo_ray.py passes"
        " `args.actor.model_name_or_path` to the reference actor); so does verl 0.9.0 (engine_workers.py copies the"
        " actor's model config to the reference). Only verl 0.7's legacy FSDP worker (its default) reads a separate"
        " `+actor_rollout_ref.ref.model.path=...`; verl 0.8 dropped that worker."
        + (" This export wrote the reference to `reference/`." if info.get("reference") else ""),
        "- Moving references (`ref.update=ema|sync`) have no counterpart in either launch line; `missing_eos_penalty`,"
        " `whiten_rewards`, `vf_coef`, learning rates and batch sizes are not carried over: set them in the engine.",
        "- Prompts longer than the prompt limit: SALSA cuts the start of their text and keeps BOS and the template;"
        " OpenRLHF keeps their last tokens, verl refuses them (`data.filter_overlong_prompts=True` drops them)."
        f" Longest query here: {info['prompts']['longest_tokens']} tokens.",
    ]
    if any(src.get("pipeline_quant") == "nf4" for src in info["sources"].values()):
        lines.append(
            "- The pipeline trained these adapters on the base quantised to nf4; the export merges them into the"
            " unquantised base, so the engine's models differ from the pipeline's by the quantisation error."
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------------------------
def export(
    cache: str | os.PathLike, out: str | os.PathLike, soup: str | None = None, rm: str | None = None,
    ppo: str | None = None, reference: str | None = None, dtype: str = "bf16", prompts: int | None = None,
    base: str | None = None, kl_coef: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write the export into `out` (a new directory; built in `<out>.partial` and renamed when complete) and return
    its `export.json`. `soup`, `rm` and `reference` default to those of the PPO stage `ppo`."""
    cache, out = Path(cache), Path(out).resolve()
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if prompts is not None and prompts < 1:
        raise ExportError(f"--prompts must be at least 1, got {prompts}")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty; choose a new directory")
    ppo_stage = find_stage(cache, ppo, "--ppo") if ppo else None
    if ppo_stage is not None and ppo_stage.name != "ppo":
        raise ExportError(f"--ppo {ppo_stage.path}: a {ppo_stage.name} stage, not a ppo stage")
    from_ppo = ppo_stage.spec if ppo_stage is not None else {}
    soup, rm = soup or from_ppo.get("policy_init"), rm or from_ppo.get("rm")
    if reference is None and from_ppo.get("reference") not in (None, from_ppo.get("policy_init")):
        reference = from_ppo["reference"]
    if not soup or not rm:
        raise ExportError("give --soup and --rm (stage keys or directories), or --ppo to take them from a PPO stage")
    start, reward = find_stage(cache, soup, "--soup"), find_stage(cache, rm, "--rm")
    check_kind(start, "policy", "--soup")
    check_kind(reward, "reward", "--rm")
    ref = find_stage(cache, reference, "--reference") if reference else None
    if ref is not None:
        check_kind(ref, "policy", "--reference")
    data, data_stage = data_config([s for s in (start, reward, ppo_stage, ref) if s is not None])
    settings = ppo_settings(ppo_stage, kl_coef)

    jobs = [("policy_init", start, False), ("reward_model", reward, True)]
    jobs += [("reference", ref, False)] if ref else []
    for (_, stage, is_reward), flag in zip(jobs, ("--soup", "--rm", "--reference"), strict=False):
        check_loadable(cache, stage, is_reward, base, flag)

    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        info = _write(cache, work, out, jobs, data, data_stage, ppo_stage, settings, dtype, prompts, base)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.rename(work, out)
    return info


def _write(
    cache: Path, work: Path, out: Path, jobs: list, data: dict[str, Any], data_stage: Stage, ppo_stage: Stage | None,
    settings: dict[str, Any], dtype: str, prompts: int | None, base: str | None,
) -> dict[str, Any]:  # fmt: skip
    """The export's files, written into `work`; the launch lines name their final place under `out`."""
    sources: dict[str, Any] = {}
    for name, stage, is_reward in jobs:
        tok = export_tokenizer(cache, stage, base)
        save_model(load_model(cache, stage, DTYPES[dtype], is_reward, base), tok, work / name, is_reward)
        sources[name] = {"stage": stage.name, "key": stage.key, "path": str(stage.path), "format": stage.format}
        if stage.format == "lora":
            b = base_of(cache, stage, base)
            sources[name].update(base=b.name_or_path, base_revision=b.revision, pipeline_quant=b.pipeline_quant)
    all_prompts = task_prompts(data)
    chosen = all_prompts[:prompts] if prompts else all_prompts
    write_prompts(chosen, work, f"salsa/{data.get('name', 'task')}")
    lengths = query_lengths(export_tokenizer(cache, jobs[0][1], base), chosen)
    limit = settings.get("max_prompt_length")
    prompt_info = {
        "count": len(chosen),
        "of": len(all_prompts),
        "source": f"data.task of {data_stage.name} {data_stage.key}",
        "longest_tokens": max(lengths, default=0),
    }
    if limit:
        prompt_info["longer_than_max_prompt_length"] = sum(n > limit for n in lengths)
    if ppo_stage is not None:
        sources["ppo"] = {"stage": "ppo", "key": ppo_stage.key, "path": str(ppo_stage.path)}
    written = [name for name in PATHS if name != "reference" or "reference" in sources]
    info: dict[str, Any] = {
        "dtype": dtype,
        "keys": {name: source["key"] for name, source in sources.items()},
        "sources": sources,
        "paths": {name: PATHS[name] for name in written},
        "reference": "reference" in sources,
        "prompts": prompt_info,
        "ppo": settings,
        "engines": ENGINES,
        "tokenizer": TOKENIZER_NOTE,
    }
    openrlhf = command("python -m openrlhf.cli.train_ppo_ray", openrlhf_args(out, settings), "flags")
    verl = command("python -m verl.trainer.main_ppo", verl_args(out, settings), "overrides")
    (work / "launch.md").write_text(launch_md(openrlhf, verl, info))
    for name, cmd in (("launch_openrlhf.sh", openrlhf), ("launch_verl.sh", verl)):
        (work / name).write_text(launch_script(cmd, settings.get("kl_coef")))
        (work / name).chmod(0o755)
    (work / "export.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return info


def main(argv: Sequence[str] | None = None) -> None:
    """Export a pipeline's policy start (the soup), reward model and PPO prompts for OpenRLHF or verl."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m salsa.export_engine", description=main.__doc__)
    parser.add_argument("--cache", default="logs/cache", help="the stage cache (paths.cache_dir); default logs/cache")
    parser.add_argument("--soup", help="the policy's start and KL reference: a stage key or directory (soup, sft)")
    parser.add_argument("--rm", help="the reward model: an rm or rm_soup stage key or directory")
    parser.add_argument("--ppo", help="a PPO stage: its start, reference, reward model and settings (kl_coef, ...)")
    parser.add_argument("--reference", help="a KL reference other than the start (ref=other), written to reference/")
    parser.add_argument("--out", required=True, help="new directory for the export")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights' dtype (default bf16)")
    parser.add_argument("--prompts", type=int, help="at most this many prompts (default: all of the task's)")
    parser.add_argument("--base", help="for LoRA stages: a local unquantised copy of their base")
    parser.add_argument("--kl-coef", type=float, help="the KL coefficient (default: the PPO stage's ppo.kl_coef)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the command prints its own two lines
    try:
        info = export(
            args.cache, args.out, args.soup, args.rm, args.ppo, args.reference, args.dtype, args.prompts, args.base,
            args.kl_coef,
        )  # fmt: skip
    except SalsaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out).resolve()
    print(f"exported {info['keys']} ({args.dtype}) and {info['prompts']['count']} prompts to {out}")
    print(f"launch lines: {out / 'launch.md'}")


if __name__ == "__main__":
    main()
