"""`python -m salsa.export_engine`: the soup, reward model and PPO prompts a pipeline hands to OpenRLHF or verl are
the pipeline's own (same logits, same reward scores, same queries), the launch lines name the exported files, and
inputs that cannot be exported fail in one line with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from salsa.data.tokens import pad_left, pad_right, prompt_ids, response_ids
from salsa.export_engine import export, main
from salsa.models.hf import load_tokenizer, position_ids_from_mask, sequence_scores

TINY_ARCH = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16,
}  # fmt: skip
SMALL_TASK = {
    "_target_": "salsa.data.task.synthetic_data", "seed": 0, "n_pretrain": 32, "n_sft": 16, "n_sft_val": 4,
    "n_pairs": 8, "n_pairs_val": 6, "n_prompts": 12, "n_eval_prompts": 4,
}  # fmt: skip


@dataclass
class Pipeline:
    """Stage outputs in a cache, and what the pipeline made of them: its PPO prompts, how it loads its models."""

    cache: Path
    soup: str
    rm: str
    sft: list[str]
    prompts: list[str]  # the PPO training prompts, as the pipeline's TaskData has them
    pairs: list  # preference pairs whose answers the reward models score
    loader: object  # the pipeline's stage-output loader (`salsa.models.loaders`)
    extra: dict = field(default_factory=dict)

    def stage(self, key: str) -> Path:
        (path,) = self.cache.glob(f"*/{key}")
        return path


def publish(cache: Path, stage: str, key: str, manifest: dict) -> Path:
    """Write a stage's manifest as the stage cache does once its files are in place."""
    path = cache / stage / key
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"stage": stage, "key": key, **manifest}))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Caches: the real debug-size pipeline (slow), a hand-made one in the same formats, and a hub-shaped LoRA one
# ---------------------------------------------------------------------------------------------------------------
def handmade_full(root: Path) -> Pipeline:
    """Full-weight stages as the embedded model's pipeline writes them, from random tiny Gemmas (nothing trained):
    two SFT ingredients (attention dropout 0.1, as SFT saves them), their soup, and a reward model."""
    from salsa.data.task import synthetic_data
    from salsa.merge.soup import soup_checkpoints
    from salsa.models.hf import load_reward_model, tiny_gemma, train_word_tokenizer
    from salsa.models.loaders import FullLoader
    from salsa.stages.base import task_texts

    data = synthetic_data(**{k: v for k, v in SMALL_TASK.items() if k != "_target_"})
    spec = {"data": {"name": "synthetic", "task": SMALL_TASK}}
    tok = train_word_tokenizer(task_texts(data))
    cache = root / "cache"
    sft = []
    for i in range(2):
        torch.manual_seed(100 + i)
        path = cache / "sft" / f"sft{i}"
        tiny_gemma(tok, attention_dropout=0.1, **TINY_ARCH).save_pretrained(path)
        tok.save_pretrained(path)
        publish(cache, "sft", f"sft{i}", {"format": "full", "spec": spec, "index": i})
        sft.append(f"sft{i}")
    soup_checkpoints([cache / "sft" / k for k in sft], cache / "soup" / "soup3")
    publish(cache, "soup", "soup3", {"format": "full", "spec": {"ingredients": sft, **spec}})
    rm = load_reward_model(cache / "sft" / "sft0")
    torch.manual_seed(7)
    rm.score.weight.data.normal_(0, 0.5)  # a head whose scores differ between answers
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(cache / "rm" / "rm0")
    tok.save_pretrained(cache / "rm" / "rm0")
    publish(cache, "rm", "rm0", {"format": "full", "spec": {"base": "base0", **spec}, "role": "policy"})
    return Pipeline(cache, "soup3", "rm0", sft, list(data.prompts_train), list(data.pairs_val), FullLoader())


def upstream_full(upstream: Path) -> Pipeline:
    """The real pipeline's base, SFT ingredients, soup and reward model at debug sizes (`upstream`, built once)."""
    from salsa.infra.context import Context
    from salsa.models.loaders import FullLoader
    from salsa.pipeline import run
    from tests.conftest import make_cfg

    cfg = make_cfg(upstream, "stage=rm")
    ctx = Context.from_cfg(cfg)
    run(cfg, ctx)  # every stage comes from the cache
    by_stage = {}
    for e in ctx.entries:
        by_stage.setdefault(e.stage, []).append(e.key)
    (soup,), (rm,) = by_stage["soup"], by_stage["rm"]
    data = ctx.data
    return Pipeline(upstream / "cache", soup, rm, by_stage["sft"], list(data.prompts_train), list(data.pairs_val),
                    FullLoader())  # fmt: skip


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hub_lora(root: Path) -> Pipeline:
    """Stages as the hub path writes them: a base stage recording a local Gemma-shaped checkpoint (loaded nf4 by the
    pipeline), two LoRA SFT ingredients, their exact LoRA soup and a LoRA reward model with its float32 head, on
    UltraFeedback-format files. The adapters' B factors are random, so every adapter changes the model."""
    from salsa.config import LoraSettings
    from salsa.data.hub import hub_data
    from salsa.merge.soup import soup_lora_adapters
    from salsa.models.loaders import AdapterLoader
    from salsa.models.qlora import BaseSettings, new_adapter_model
    from tests.hub_fixtures import gemma_checkpoint, gemma_tokenizer, ultrafeedback_dir

    ckpt = gemma_checkpoint(root / "gemma", vocab=len(gemma_tokenizer()))
    files = ultrafeedback_dir(root / "ultrafeedback", n=24)
    task = {
        "_target_": "salsa.data.hub.hub_data", "kind": "ultrafeedback",
        "dataset": "HuggingFaceH4/ultrafeedback_binarized", "path": str(files), "seed": 0, "n_sft_val": 4,
        "n_pairs_val": 6, "n_eval_prompts": 4,
    }  # fmt: skip
    spec = {"data": {"name": "ultrafeedback", "path": str(files), "task": task}}
    cache = root / "cache"
    publish(cache, "base", "hubbase", {"format": "hub", "name_or_path": str(ckpt), "revision": None, "quant": "nf4"})
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS)
    settings = BaseSettings(name_or_path=str(ckpt), quant="none", gradient_checkpointing=False, lora=lora)

    def adapter(key: str, stage: str, seed: int, head: bool) -> Path:
        torch.manual_seed(seed)
        tok, model = new_adapter_model(settings, "cpu", scalar_head=head)
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "score" in name):
                p.data.normal_(0, 0.2)
        path = cache / stage / key
        model.save_pretrained(str(path))
        tok.save_pretrained(str(path))
        return path

    sft = [adapter(f"lsft{i}", "sft", 10 + i, head=False) for i in range(2)]
    for i, path in enumerate(sft):
        publish(cache, "sft", path.name, {"format": "lora", "base": "hubbase", "spec": spec, "index": i})
    soup_lora_adapters(sft, cache / "soup" / "lsoup")
    publish(cache, "soup", "lsoup", {"format": "lora", "base": "hubbase", "spec": spec})
    adapter("lrm", "rm", 20, head=True)
    publish(cache, "rm", "lrm", {"format": "lora", "base": "hubbase", "spec": spec, "role": "policy"})
    data = hub_data(**{k: v for k, v in task.items() if k != "_target_"})
    pipeline = Pipeline(cache, "lsoup", "lrm", [p.name for p in sft], list(data.prompts_train), list(data.pairs_val),
                        AdapterLoader(settings, "cpu"))  # fmt: skip
    pipeline.extra["checkpoint"] = ckpt
    return pipeline


@pytest.fixture(scope="module", params=["handmade", pytest.param("upstream", marks=pytest.mark.slow), "hub_lora"])
def pipeline(request, tmp_path_factory) -> Pipeline:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "handmade":
        return handmade_full(root)
    if request.param == "upstream":
        return upstream_full(request.getfixturevalue("upstream"))
    return hub_lora(root)


@pytest.fixture(scope="module")
def exported(pipeline, tmp_path_factory) -> dict[str, Path]:
    """The pipeline exported in float32 (all prompts) and in bf16 (the first 5 prompts)."""
    root = tmp_path_factory.mktemp("exports")
    export(pipeline.cache, root / "fp32", soup=pipeline.soup, rm=pipeline.rm, dtype="fp32")
    export(pipeline.cache, root / "bf16", soup=pipeline.soup, rm=pipeline.rm, dtype="bf16", prompts=5)
    return {"fp32": root / "fp32", "bf16": root / "bf16"}


# ---------------------------------------------------------------------------------------------------------------
# Batches the pipeline scores
# ---------------------------------------------------------------------------------------------------------------
def queries(tok, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's left-padded queries (`salsa.models.generation.encode_prompts`)."""
    ids = [prompt_ids(tok, p) for p in prompts]
    return pad_left(ids, tok.pad_token_id), pad_left([[1] * len(i) for i in ids], 0)


def answers(tok, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt + answer (+ EOS) sequences, the reward model's batches (`salsa.stages.rm.pair_batch`)."""
    seqs = [prompt_ids(tok, p.prompt) + response_ids(tok, a, True) for p in pairs for a in (p.chosen, p.rejected)]
    return pad_right(seqs, tok.pad_token_id), pad_right([[1] * len(s) for s in seqs], 0)


@torch.no_grad()
def causal_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the attended positions (as PPO calls the model: positions from the mask)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return logits[mask.bool()].float()


# ---------------------------------------------------------------------------------------------------------------
# (a) the soup, (b) the reward model
# ---------------------------------------------------------------------------------------------------------------
def test_fp32_export_of_the_soup_gives_the_pipelines_logits(pipeline, exported):
    tok = load_tokenizer(pipeline.stage(pipeline.soup))
    ids, mask = queries(tok, pipeline.prompts)
    reference = causal_logits(pipeline.loader.causal(pipeline.stage(pipeline.soup)), ids, mask)
    model = AutoModelForCausalLM.from_pretrained(exported["fp32"] / "policy_init").eval()
    assert model.dtype == torch.float32 and model.config.attention_dropout == 0.0
    torch.testing.assert_close(causal_logits(model, ids, mask), reference, atol=1e-5, rtol=1e-5)


def test_bf16_export_of_the_soup_is_the_soup_in_bf16(pipeline, exported):
    tok = load_tokenizer(pipeline.stage(pipeline.soup))
    ids, mask = queries(tok, pipeline.prompts)
    reference = causal_logits(pipeline.loader.causal(pipeline.stage(pipeline.soup)), ids, mask)
    model = AutoModelForCausalLM.from_pretrained(exported["bf16"] / "policy_init").eval()
    assert model.dtype == torch.bfloat16
    weights = load_file(exported["bf16"] / "policy_init" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    if (pipeline.stage(pipeline.soup) / "model.safetensors").is_file():  # full weights: exactly the soup, rounded
        soup = load_file(pipeline.stage(pipeline.soup) / "model.safetensors")
        assert weights.keys() == soup.keys()
        for name, t in soup.items():
            assert torch.equal(weights[name], t.to(torch.bfloat16)), name
    scale = reference.abs().max()
    torch.testing.assert_close(causal_logits(model, ids, mask), reference, atol=0.03 * scale, rtol=0.03)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_exported_reward_model_gives_the_pipelines_scores(pipeline, exported, dtype):
    tok = load_tokenizer(pipeline.stage(pipeline.rm))
    ids, mask = answers(tok, pipeline.pairs)
    with torch.no_grad():
        pipeline_rm = pipeline.loader.reward(pipeline.stage(pipeline.rm))
        reference = sequence_scores(pipeline_rm, ids, mask)
        model = AutoModelForSequenceClassification.from_pretrained(exported[dtype] / "reward_model").eval()
        scores = sequence_scores(model, ids, mask).float()
        native = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()  # what an engine's loader reads
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    assert reference.std() > 1e-3  # the head tells answers apart
    torch.testing.assert_close(native, scores, atol=1e-5, rtol=1e-5)
    if dtype == "fp32":
        torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)
        return
    assert model.dtype == torch.bfloat16
    torch.testing.assert_close(scores, reference, atol=0.1 * reference.abs().max(), rtol=0)
    if (pipeline.stage(pipeline.rm) / "model.safetensors").is_file():  # full weights: exactly the RM, rounded
        weights = load_file(exported[dtype] / "reward_model" / "model.safetensors")
        rm = load_file(pipeline.stage(pipeline.rm) / "model.safetensors")
        assert weights.keys() == rm.keys() and "score.weight" in rm
        for name, t in rm.items():
            assert torch.equal(weights[name], t.to(torch.bfloat16)), name


# ---------------------------------------------------------------------------------------------------------------
# (c) prompts, (d) launch lines
# ---------------------------------------------------------------------------------------------------------------
def test_prompts_are_the_ppo_prompts_and_make_the_ppo_queries(pipeline, exported):
    for dtype, expected in (("fp32", pipeline.prompts), ("bf16", pipeline.prompts[:5])):
        lines = (exported[dtype] / "prompts.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == [{"prompt": p} for p in expected]
        table = pd.read_parquet(exported[dtype] / "prompts.parquet")
        assert [list(map(dict, m)) for m in table["prompt"]] == [[{"role": "user", "content": p}] for p in expected]
        info = json.loads((exported[dtype] / "export.json").read_text())
        assert info["prompts"]["count"] == len(expected) and info["prompts"]["of"] == len(pipeline.prompts)
    # an engine renders the chat template to text and tokenizes it without added special tokens (OpenRLHF), or
    # applies the template directly (verl): both give the query ids SALSA's PPO used
    pipeline_tok = load_tokenizer(pipeline.stage(pipeline.soup))
    engine_tok = load_tokenizer(exported["fp32"] / "policy_init")
    for p in pipeline.prompts:
        messages = [{"role": "user", "content": p}]
        text = engine_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert engine_tok(text, add_special_tokens=False)["input_ids"] == prompt_ids(pipeline_tok, p)


def launch_argv(script: Path, tmp_path: Path, *extra: str, env: dict | None = None) -> list[str]:
    """The arguments a launch script passes to `python`, captured by a stand-in `python` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGV_OUT"\n')
    fake.chmod(0o755)
    out = tmp_path / "argv.txt"
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGV_OUT": str(out), **(env or {})}
    subprocess.run(["bash", str(script), *extra], check=True, env=run_env, capture_output=True)
    return out.read_text().splitlines()


def test_launch_lines_name_the_exported_files(pipeline, exported, tmp_path):
    out = exported["fp32"]
    argv = launch_argv(out / "launch_openrlhf.sh", tmp_path, "--vllm.num_engines", "2", env={"KL_COEF": "0.05"})
    assert argv[:2] == ["-m", "openrlhf.cli.train_ppo_ray"] and argv[-2:] == ["--vllm.num_engines", "2"]
    assert "--data.apply_chat_template" in argv
    argv = [a for a in argv if a not in ("--data.apply_chat_template", "--ckpt.save_hf")]
    flags = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert flags["--actor.model_name_or_path"] == str(out / "policy_init")
    assert flags["--reward.model_name_or_path"] == str(out / "reward_model")
    assert flags["--data.prompt_dataset"] == str(out / "prompts.jsonl")
    assert flags["--data.input_key"] == "prompt" and flags["--algo.kl.init_coef"] == "0.05"

    argv = launch_argv(out / "launch_verl.sh", tmp_path, env={"KL_COEF": "0.05"})
    assert argv[:2] == ["-m", "verl.trainer.main_ppo"]
    overrides = dict(a.split("=", 1) for a in argv[2:])
    assert overrides["actor_rollout_ref.model.path"] == str(out / "policy_init")
    assert overrides["reward.reward_model.model_path"] == str(out / "reward_model")
    assert overrides["reward.reward_model.enable"] == "True" and overrides["algorithm.kl_ctrl.kl_coef"] == "0.05"
    assert overrides["data.train_files"] == str(out / "prompts.parquet")
    for path in (out / "policy_init", out / "reward_model", out / "prompts.jsonl", out / "prompts.parquet"):
        assert path.exists()
        assert str(path) in (out / "launch.md").read_text()
    # the run's KL coefficient is unknown here (no PPO stage): the scripts refuse to run without one
    failed = subprocess.run(["bash", str(out / "launch_verl.sh")], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "KL_COEF"})  # fmt: skip
    assert failed.returncode != 0 and "KL_COEF" in failed.stderr
    info = json.loads((out / "export.json").read_text())
    assert info["keys"] == {"policy_init": pipeline.soup, "reward_model": pipeline.rm}
    assert info["dtype"] == "fp32" and set(info["engines"]) == {"openrlhf", "verl"}
    assert sorted(p.name for p in out.iterdir()) == sorted(info["paths"])


def test_a_ppo_stage_brings_its_settings_and_a_reference_apart_from_the_start(pipeline, tmp_path):
    """`--ppo`: the start, reference and reward model named in a PPO stage's key, and its `ppo.*` settings. With
    `ref=other` (the reference is another SFT ingredient) the reference is exported beside the start and flagged."""
    cache = tmp_path / "cache"
    shutil.copytree(pipeline.cache, cache, symlinks=True)
    settings = {"kl_coef": 0.07, "kl_estimator": "k1", "target_kl": None, "gamma": 1.0, "lam": 0.95, "clip": 0.2,
                "value_clip": 0.2, "temperature": 0.7, "max_prompt_length": 32, "response_length": 40}  # fmt: skip
    spec = {"policy_init": pipeline.sft[0], "reference": pipeline.sft[1], "rm": pipeline.rm, "ppo": settings}
    publish(cache, "ppo", "ppo0", {"format": "full", "spec": spec})
    info = export(cache, tmp_path / "out", ppo="ppo0", dtype="fp32", prompts=3)
    out = tmp_path / "out"
    assert info["keys"] == {"policy_init": pipeline.sft[0], "reward_model": pipeline.rm, "reference": pipeline.sft[1],
                            "ppo": "ppo0"}  # fmt: skip
    assert info["ppo"]["kl_coef"] == 0.07 and info["reference"] is True
    argv = launch_argv(out / "launch_openrlhf.sh", tmp_path)  # KL_COEF defaults to the run's
    argv = [a for a in argv if a not in ("--data.apply_chat_template", "--ckpt.save_hf")]
    flags = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert flags["--algo.kl.init_coef"] == "0.07" and flags["--rollout.temperature"] == "0.7"
    assert flags["--rollout.max_new_tokens"] == "40" and flags["--data.max_len"] == "72"
    assert flags["--algo.advantage.lambd"] == "0.95" and flags["--algo.kl.estimator"] == "k1"
    tok = load_tokenizer(pipeline.stage(pipeline.sft[1]))
    ids, mask = queries(tok, pipeline.prompts[:4])
    reference = causal_logits(pipeline.loader.causal(pipeline.stage(pipeline.sft[1])), ids, mask)
    model = AutoModelForCausalLM.from_pretrained(out / "reference").eval()
    torch.testing.assert_close(causal_logits(model, ids, mask), reference, atol=1e-5, rtol=1e-5)
    assert "This export wrote the reference to `reference/`" in (out / "launch.md").read_text()


def test_a_lora_export_merges_into_the_unquantised_base_and_says_so(pipeline, exported):
    info = json.loads((exported["bf16"] / "export.json").read_text())
    source = info["sources"]["policy_init"]
    if pipeline.loader.__class__.__name__ != "AdapterLoader":
        assert source["format"] == "full" and "base" not in source
        return
    assert source["format"] == "lora" and source["base"] == str(pipeline.extra["checkpoint"])
    assert source["pipeline_quant"] == "nf4"
    assert "quantisation error" in (exported["bf16"] / "launch.md").read_text()
    assert not (exported["bf16"] / "policy_init" / "adapter_config.json").exists()  # plain weights, no adapter
    tok = load_tokenizer(pipeline.stage(pipeline.soup))
    ids, mask = queries(tok, pipeline.prompts)
    base = causal_logits(AutoModelForCausalLM.from_pretrained(pipeline.extra["checkpoint"]).eval(), ids, mask)
    merged = causal_logits(AutoModelForCausalLM.from_pretrained(exported["fp32"] / "policy_init").eval(), ids, mask)
    assert (merged - base).abs().max() > 0.1  # the soup's delta is in the weights


def test_a_tokenizer_without_chat_template_gets_salsas_plain_prompt_format(tmp_path):
    """Llama- and Mistral-like tokenizers have no chat template and no pad token: the export gives them SALSA's plain
    format (`<bos>{prompt}\\n\\n`) as one and eos as pad, so the engines build SALSA's queries."""
    from salsa.export_engine import Stage, export_tokenizer
    from tests.hub_fixtures import PROMPTS, tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "llama", "llama")
    original = load_tokenizer(path)
    assert original.chat_template is None
    tok = export_tokenizer(tmp_path, Stage("sft", "k", path, {"format": "full"}), None)
    tok.save_pretrained(tmp_path / "saved")
    saved = load_tokenizer(tmp_path / "saved")
    assert saved.pad_token_id == saved.eos_token_id
    for p in PROMPTS:
        text = saved.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        assert text == f"{saved.bos_token}{p}\n\n"
        assert saved(text, add_special_tokens=False)["input_ids"] == prompt_ids(original, p)


# ---------------------------------------------------------------------------------------------------------------
# (e) errors: one line, a non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Pipeline:
    return handmade_full(tmp_path_factory.mktemp("errors"))


def refused(capsys, tmp_path: Path, *args: str) -> str:
    out = tmp_path / "export"
    capsys.readouterr()  # what the test printed before
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not out.exists() and not out.with_name("export.partial").exists()
    return err


def test_missing_stages_are_refused(small, capsys, tmp_path):
    cache = str(small.cache)
    assert "no stage 'nosuchkey' in the cache" in refused(capsys, tmp_path, "--cache", cache, "--soup", "nosuchkey",
                                                          "--rm", small.rm)  # fmt: skip
    partial = small.cache / "soup" / "half.partial"
    partial.mkdir(exist_ok=True)
    assert "not a finished stage directory" in refused(capsys, tmp_path, "--cache", cache, "--soup", str(partial),
                                                       "--rm", small.rm)  # fmt: skip
    assert "give --soup and --rm" in refused(capsys, tmp_path, "--cache", cache, "--soup", small.soup)


def test_stages_of_the_wrong_kind_are_refused(small, capsys, tmp_path):
    cache = str(small.cache)
    err = refused(capsys, tmp_path, "--cache", cache, "--soup", small.soup, "--rm", small.sft[0])
    assert "causal LM without a trained scalar head" in err
    err = refused(capsys, tmp_path, "--cache", cache, "--soup", small.rm, "--rm", small.rm)
    assert "is a reward model, not a causal LM" in err
    publish(small.cache, "base", "hubbase", {"format": "hub", "name_or_path": "google/gemma-2b"})
    err = refused(capsys, tmp_path, "--cache", cache, "--soup", "hubbase", "--rm", small.rm)
    assert "only records the hub model google/gemma-2b" in err


def test_an_existing_output_directory_is_kept(small, capsys, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--cache", str(small.cache), "--soup", small.soup, "--rm", small.rm])
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_base_with_only_quantised_weights_is_refused(capsys, tmp_path):
    """A LoRA stage on a checkpoint that ships 4-bit weights only (a `quantization_config` in its config) cannot be
    merged into plain weights: refused before anything is written, pointing at --base."""
    from tests.hub_fixtures import gemma_checkpoint, gemma_tokenizer

    ckpt = gemma_checkpoint(tmp_path / "gemma-bnb-4bit", vocab=len(gemma_tokenizer()))
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (ckpt / "config.json").write_text(json.dumps(config))
    cache = tmp_path / "cache"
    publish(cache, "base", "b4", {"format": "hub", "name_or_path": str(ckpt), "quant": "nf4"})
    for stage, key in (("soup", "s4"), ("rm", "r4")):
        spec = {"data": {"name": "synthetic", "task": SMALL_TASK}}
        path = publish(cache, stage, key, {"format": "lora", "base": "b4", "spec": spec})
        (path / "adapter_model.safetensors").write_bytes(b"")  # never read: the base is refused first
    err = refused(capsys, tmp_path, "--cache", str(cache), "--soup", "s4", "--rm", "r4")
    assert "holds only quantised weights (bitsandbytes)" in err and "--base" in err
    err = refused(capsys, tmp_path, "--cache", str(cache), "--soup", "s4", "--rm", "r4", "--base", str(tmp_path / "no"))
    assert "no such directory" in err


def test_the_command_line_fails_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "salsa.export_engine", "--cache", str(tmp_path), "--soup", "abc", "--rm", "def", "--out",
         str(tmp_path / "out")], capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --soup abc: no such stage directory, and no stage 'abc' in the cache {tmp_path}"
    ]
