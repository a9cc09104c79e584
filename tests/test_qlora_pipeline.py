"""The whole pipeline on a local checkpoint under QLoRA with UltraFeedback-format files, through answer export."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from salsa.data.benchmarks import question_turns
from salsa.infra.context import Context
from salsa.pipeline import run
from tests.conftest import make_cfg
from tests.hub_fixtures import tiny_checkpoint, ultrafeedback_dir, write_jsonl

pytestmark = pytest.mark.slow

MT_BENCH = [
    {"question_id": 81, "category": "writing", "turns": ["write a poem about the sea", "make it shorter"]},
    {"question_id": 101, "category": "reasoning", "turns": ["why is the sky blue", "explain it again"]},
]


def test_qlora_pipeline_on_local_checkpoint_and_files(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "gemma", "gemma")
    data = ultrafeedback_dir(tmp_path / "uf", n=16)
    questions = write_jsonl(tmp_path / "question.jsonl", MT_BENCH)
    cfg = make_cfg(
        tmp_path / "logs",
        "model=gemma2b",
        f"model.name_or_path={ckpt}",
        "model.lora.r=2",
        "model.lora.target_modules=[q_proj,v_proj,down_proj]",
        "data=ultrafeedback",
        f"data.path={data}",
        "ref=soup2",
        "ppo.response_length=6",
        "ppo.iterations=1",
        "eval.export=mt_bench",
        f"eval.answers.questions={questions}",
        "eval.answers.max_new_tokens=5",
        "eval.answers.model_id=salsa-test",
    )
    from salsa.models import qlora

    loads_before = len(qlora.LOADED)
    ctx = Context.from_cfg(cfg)
    results = run(cfg, ctx)
    # each stage that needs the base loads it once and frees it when it ends: never two bases in memory
    loads = qlora.LOADED[loads_before:]
    built = [e.stage for e in ctx.entries if not e.reused and e.stage != "base"]
    assert len(loads) == len(built) and max(alive for _, _, alive in loads) == 1
    assert all(ref() is None for _, ref, _ in loads)
    # on hub data the judge is a second reward model, trained with another seed on pairs the policy's never saw
    assert results["judge"] == "heldout_rm" and results["gold_reward"] is None
    (policy_rm,) = [e for e in ctx.entries if e.stage == "rm" and e.manifest["role"] == "policy"]
    (judge_rm,) = [e for e in ctx.entries if e.stage == "rm" and e.manifest["role"] == "judge"]
    assert results["judge_model"] == judge_rm.key != policy_rm.key
    assert policy_rm.manifest["spec"]["pairs"] == [0, 8] and judge_rm.manifest["spec"]["pairs"] == [8, 16]
    assert 0.0 <= results["judge_accuracy"] <= 1.0
    assert 0.0 <= results["win_rate_vs_sft"] <= 1.0 and 0.0 <= results["win_rate_vs_ppo"] <= 1.0
    entries = {}
    for e in ctx.entries:
        entries.setdefault(e.stage, []).append(e)
    for stage in ("sft", "soup", "rm", "ppo"):
        assert {e.manifest["format"] for e in entries[stage]} == {"lora"}, stage
    # the soup is one adapter of rank r1 + r2; the PPO policy adds the policy adapter's rank on top
    soup = entries["soup"][0]
    assert json.loads((soup.path / "adapter_config.json").read_text())["r"] == 4
    policy = entries["ppo"][0]
    assert json.loads((policy.path / "adapter_config.json").read_text())["r"] == 6
    # every adapter loads with plain peft on the base (no project code)
    x = torch.randint(6, 40, (2, 7))
    for entry in (*entries["sft"], soup, policy):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt), entry.path).eval()
        assert torch.isfinite(model(x).logits).all()
    assert any(k.endswith("score.weight") for k in load_file(entries["rm"][0].path / "adapter_model.safetensors"))

    # the exported answers are FastChat model_answer lines, question ids kept, one answer per turn
    lines = [json.loads(line) for line in Path(results["export_file"]).read_text().splitlines()]
    assert results["export_file"].endswith("mt_bench/model_answer/salsa-test.jsonl")
    assert [a["question_id"] for a in lines] == [81, 101]
    for a, q in zip(lines, MT_BENCH, strict=True):
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == "salsa-test" and len(a["choices"][0]["turns"]) == len(question_turns(q))
        assert all(isinstance(t, str) for t in a["choices"][0]["turns"])

    # a second run reuses everything, and changing only the export does not redo the evaluation
    ctx2 = Context.from_cfg(cfg)
    run(cfg, ctx2)
    assert all(e.reused for e in ctx2.entries)
    with open_dict(cfg):
        cfg.eval.answers.max_new_tokens = 3
    ctx3 = Context.from_cfg(cfg)
    run(cfg, ctx3)
    assert [e.stage for e in ctx3.entries if not e.reused] == ["export"]


def test_qlora_training_checkpoints_hold_adapters_only(tmp_path):
    """The SFT and reward modules' checkpoints (what resume writes every interval) hold no base weights."""
    from salsa.models.qlora import BaseSettings, LoraSettings, new_adapter_model
    from salsa.stages.lm import SFTModule
    from salsa.stages.rm import RewardModule

    ckpt = tiny_checkpoint(tmp_path / "llama", "llama")
    settings = BaseSettings(str(ckpt), lora=LoraSettings(r=2, target_modules=["q_proj"]))
    _, sft = new_adapter_model(settings, "cpu")
    _, rm = new_adapter_model(settings, "cpu", scalar_head=True)
    for module in (SFTModule(sft, lr=1e-3), RewardModule(rm.get_base_model(), lr=1e-3)):
        state = module.state_dict()
        assert state and all(".lora_" in k or "modules_to_save" in k for k in state), sorted(state)[:3]
        assert not module.load_state_dict(state, strict=True).missing_keys


@pytest.mark.parametrize(
    ("algo", "quant"), [("dpo", "nf4"), ("grpo", "nf4"), ("rloo", "none")], ids=["dpo-nf4", "grpo-nf4", "rloo-merged"]
)
def test_algorithms_on_adapters_of_one_base(algo, quant, tmp_path):
    """DPO, GRPO and RLOO on a local checkpoint under QLoRA (and RLOO with the start merged into a plain-weight base):
    the policy is an adapter that loads with plain peft, and DPO starts at its reference (log 2 per pair)."""
    import math

    ckpt = tiny_checkpoint(tmp_path / "gemma", "gemma")
    data = ultrafeedback_dir(tmp_path / "uf", n=16)
    cfg = make_cfg(
        tmp_path / "logs",
        "model=gemma2b",
        f"model.name_or_path={ckpt}",
        f"model.quant={quant}",
        "model.lora.r=2",
        "model.lora.target_modules=[q_proj,v_proj]",
        "data=ultrafeedback",
        f"data.path={data}",
        "ref=soup2",
        "stage=ppo",
        f"algo={algo}",
        f"{algo}.iterations=1" if algo != "dpo" else "dpo.batch_size=4",
        *([f"{algo}.response_length=6", f"{algo}.batch_size=2", f"{algo}.group_size=2"] if algo != "dpo" else []),
    )
    ctx = Context.from_cfg(cfg)
    run(cfg, ctx)
    (policy,) = [e for e in ctx.entries if e.stage == algo and not e.reused][:1]
    assert policy.manifest["format"] == "lora"
    if algo == "dpo":
        assert policy.manifest["metrics"]["first_step_loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    # the soup's rank (2 + 2) plus the new adapter's: one plain peft adapter on the unmerged base
    assert json.loads((policy.path / "adapter_config.json").read_text())["r"] == 6
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt), policy.path).eval()
    assert torch.isfinite(model(torch.randint(6, 40, (2, 7))).logits).all()
