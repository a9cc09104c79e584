"""The QLoRA memory plan on tiny Gemma-, Llama- and Mistral-architecture checkpoints saved locally, under nf4.

One base in memory; the reference = base + the mean of the ingredients' deltas; the policy starts exactly at the
reference; training moves only the policy and value adapters; what is saved loads with plain peft.
"""

from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from salsa.infra.cache import Entry
from salsa.merge.soup import soup_lora_adapters
from salsa.models.adapter_actors import build_adapter_actors
from salsa.models.qlora import (
    AdapterError,
    BaseSettings,
    LoraSettings,
    load_base,
    new_adapter_model,
    quantization_config,
    set_cpu_4bit_kernel,
)
from salsa.models.shared_base import SharedBase, read_adapter
from tests.hub_fixtures import ARCHS, tiny_checkpoint

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _entry(stage: str, path: Path) -> Entry:
    return Entry(stage, path.name, path, {}, reused=False)


def _ingredients(ckpt: Path, root: Path, ranks=(2, 2, 4)) -> list[Path]:
    """SFT-like LoRA ingredients with non-zero B (as if trained), saved by plain peft."""
    paths = []
    for i, r in enumerate(ranks):
        torch.manual_seed(10 + i)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt), cfg)
        model.save_pretrained(root / f"sft{i}")
        paths.append(root / f"sft{i}")
    return paths


def _reward_adapter(ckpt: Path, out: Path) -> Path:
    torch.manual_seed(99)
    base = AutoModelForSequenceClassification.from_pretrained(ckpt, num_labels=1)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False, task_type="SEQ_CLS")
    model = get_peft_model(base, cfg)
    model.save_pretrained(out)
    return out


def _settings(ckpt: Path, **kw) -> BaseSettings:
    lora = LoraSettings(r=4, alpha=8, target_modules=TARGETS)
    return BaseSettings(**{"name_or_path": str(ckpt), "quant": "nf4", "lora": lora, **kw})


@pytest.fixture(scope="module", params=ARCHS)
def plan(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = tiny_checkpoint(root / "base", request.param)
    ingredients = _ingredients(ckpt, root)
    soup_lora_adapters(ingredients, root / "soup")
    rm = _reward_adapter(ckpt, root / "rm")
    soup = _entry("soup", root / "soup")
    actors = build_adapter_actors(_settings(ckpt), soup, soup, _entry("rm", rm), "cpu")
    return ckpt, ingredients, rm, actors


def _batch(actors, n=3, t=10, prompt_len=4):
    vocab = actors.shared.lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(3, vocab, (n, t), generator=g)
    mask = torch.ones_like(seq)
    mask[0, :2] = 0  # one left-padded row
    return seq, mask, prompt_len


def _one_step(actors, seq, mask, p) -> None:
    """One SGD step (lr 1) on the trainable adapters and heads, through the policy's and the value's forward."""
    opt = torch.optim.SGD(actors.trainable_parameters(), lr=1.0)
    actors.train()
    loss = actors.policy_logits(seq, mask, p).logsumexp(-1).mean() + actors.values(seq, mask, p).pow(2).mean()
    loss.backward()
    opt.step()
    actors.eval()


def test_quantization_config():
    q = quantization_config("nf4", torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("none", torch.float32) is None
    with pytest.raises(AdapterError, match="model.quant"):
        quantization_config("int3", torch.float32)
    with pytest.raises(AdapterError, match="name_or_path"):
        BaseSettings.from_cfg({"name_or_path": None})


def _adapter_or_head(name: str) -> bool:
    return ".lora_" in name or "heads." in name or name.startswith("score.")


def test_base_tensors_exist_once(plan):
    _, _, _, actors = plan
    base = {n: p for n, p in actors.shared.lm.named_parameters() if ".lora_" not in n}
    assert any(isinstance(m, Linear4bit) for m in actors.shared.lm.modules()), "the base is quantised"
    # every model reaches the very same base tensors: one storage per base parameter, shared by all four
    seen = []
    for view in (actors.policy, actors.reference, actors.value, actors.reward):
        seen.append({p.data_ptr() for n, p in view.named_parameters() if not _adapter_or_head(n)})
    assert seen[0] == seen[1] == seen[2] == seen[3] == {p.data_ptr() for p in base.values()}
    assert len({p.untyped_storage().data_ptr() for p in base.values()}) == len(base)
    all_params = {id(p) for p in actors.parameters()}
    assert len(all_params) == len(list(actors.parameters()))  # parameters() yields each tensor once
    # only the policy's new adapter, the value adapter and the value head train
    trainable = [n for n, p in actors.named_parameters() if p.requires_grad]
    assert trainable and all(".policy." in n or ".value." in n or "heads.value" in n for n in trainable)


def _dequantized_linear_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The float weights a 4-bit base computes with, from a fresh load that has never run a forward.

    Reading the bytes of a base that has run forwards would depend on the CPU's kernel path: on AVX512-BF16 CPUs
    bitsandbytes may repack them into another layout (salsa switches that off; tests/test_4bit_kernels.py).
    """
    out = {}
    for name, module in load_base(_settings(ckpt), "cpu").named_modules():
        if isinstance(module, Linear4bit):
            w = module.weight
            assert not getattr(w.quant_state, "packing_format_for_cpu", False)
            out[name + ".weight"] = bnbf.dequantize_4bit(w.data, w.quant_state).float()
    return out


@torch.no_grad()
def test_reference_is_base_plus_mean_delta_and_policy_starts_there(plan):
    ckpt, ingredients, _, actors = plan
    seq, mask, p = _batch(actors)
    ref = actors.reference_logits(seq, mask, p)
    # expected: a plain float model with the dequantised base weights plus the mean of the ingredients' deltas
    expected_model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    state = expected_model.state_dict()
    state.update(_dequantized_linear_weights(ckpt))
    for path in ingredients:
        cfg, factors, _ = read_adapter(path)
        scale = cfg["lora_alpha"] / cfg["r"]
        for a_name in [k for k in factors if k.endswith("lora_A.weight")]:
            target = a_name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            b = factors[a_name.replace("lora_A", "lora_B")]
            state[target] = state[target] + scale * (b.float() @ factors[a_name].float()) / len(ingredients)
    expected_model.load_state_dict(state)
    from salsa.models.actors import response_logits

    expected = response_logits(expected_model, seq, mask, p)
    torch.testing.assert_close(ref, expected, rtol=1e-4, atol=1e-4)
    # the base alone differs (the soup's delta is not zero), and the policy equals the reference exactly
    with actors.shared.active([]):
        assert (response_logits(actors.shared.lm, seq, mask, p) - ref).abs().max() > 1e-3
    torch.testing.assert_close(actors.policy_logits(seq, mask, p), ref, rtol=0, atol=0)


def test_training_moves_policy_only_and_saved_adapters_load_with_plain_peft(plan, tmp_path):
    ckpt, _, rm, actors = plan
    seq, mask, p = _batch(actors)
    with torch.no_grad():
        ref_before, score_before = actors.reference_logits(seq, mask, p), actors.scores(seq, mask, mask[:, p:])
    _one_step(actors, seq, mask, p)
    with torch.no_grad():
        policy = actors.policy_logits(seq, mask, p)
        torch.testing.assert_close(actors.reference_logits(seq, mask, p), ref_before, rtol=0, atol=0)
        torch.testing.assert_close(actors.scores(seq, mask, mask[:, p:]), score_before, rtol=0, atol=0)
    assert (policy - ref_before).abs().max() > 1e-4

    # the policy is saved as one adapter (soup + delta summed) that plain peft loads on the quantised base. The
    # claim is about the adapter, so the plain base computes with the pipeline's 4-bit kernel (float32): left to
    # itself, bitsandbytes would take its bf16 kernel on AVX512-BF16 CPUs (tests/test_4bit_kernels.py bounds that).
    actors.save_policy(tmp_path / "policy")
    quant = quantization_config("nf4", torch.float32)

    def plain_4bit(cls, **kw):
        model = cls.from_pretrained(ckpt, quantization_config=quant, device_map="cpu", **kw)
        set_cpu_4bit_kernel(model, "float32")
        return model

    plain = PeftModel.from_pretrained(plain_4bit(AutoModelForCausalLM), tmp_path / "policy").eval()
    from salsa.models.actors import response_logits

    with torch.no_grad():
        torch.testing.assert_close(response_logits(plain, seq, mask, p), policy, rtol=1e-4, atol=1e-4)
    # the reward adapter (LoRA + score head) loads with plain peft too, and scores as the shared-base reward does
    from salsa.models.hf import sequence_scores

    reward = PeftModel.from_pretrained(plain_4bit(AutoModelForSequenceClassification, num_labels=1), rm).eval()
    with torch.no_grad():
        got = sequence_scores(reward.get_base_model(), seq, mask)
    torch.testing.assert_close(got, score_before, rtol=1e-4, atol=1e-4)


def test_checkpointed_recompute_uses_each_forwards_adapters(tmp_path):
    """PPO's loss sums a policy and a value forward; with checkpointing the backward recomputes both and must
    switch adapters back for each, or the gradients would silently be wrong."""
    ckpt = tiny_checkpoint(tmp_path / "base", "llama")
    rm = _reward_adapter(ckpt, tmp_path / "rm")
    grads = []
    for checkpointing in (False, True):
        shared = SharedBase(load_base(_settings(ckpt), "cpu"), str(ckpt))
        if checkpointing:
            shared.enable_checkpointing()
        torch.manual_seed(0)
        shared.lm.train()
        shared.load_adapter("value", rm, trainable=True)
        shared._add("policy", LoraSettings(r=2, alpha=4, target_modules=TARGETS).config(init_lora_weights=False), True)
        seq = torch.randint(3, 40, (2, 8))
        mask = torch.ones_like(seq)
        from salsa.models.hf import scalar_head_outputs

        logits = shared.causal(["policy"])(input_ids=seq, attention_mask=mask).logits
        values = scalar_head_outputs(shared.scalar(["value"], "value"), seq, mask)
        (logits.logsumexp(-1).mean() + values.pow(2).mean()).backward()
        grads.append({n: p.grad.clone() for n, p in shared.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_adapter_errors(plan, tmp_path):
    _, ingredients, _, actors = plan
    with pytest.raises(AdapterError, match="not a peft adapter"):
        actors.shared.load_adapter("x", tmp_path)
    with pytest.raises(AdapterError, match="already exists"):
        actors.shared.load_adapter("reward", ingredients[0])
    with pytest.raises(AdapterError, match="unknown adapters"), actors.shared.active(["nope"]):
        pass
    # an adapter whose tensors name modules the base lacks, or have other shapes, does not fit
    import shutil

    from safetensors.torch import save_file

    for case in ("renamed", "reshaped"):
        bad = tmp_path / case
        shutil.copytree(ingredients[0], bad)
        tensors = load_file(bad / "adapter_model.safetensors")
        name = next(k for k in tensors if k.endswith("lora_A.weight"))
        if case == "renamed":
            tensors[name.replace(".lora_A", "_elsewhere.lora_A")] = tensors.pop(name)
        else:
            tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
        save_file(tensors, bad / "adapter_model.safetensors")
        with pytest.raises(AdapterError, match="does not fit"):
            actors.shared.load_adapter(case, bad)
        assert case not in actors.shared.adapters  # a failed load leaves nothing behind


def test_checkpoints_hold_only_trainable_tensors(plan):
    """Lightning's resume checkpoints of the QLoRA actors hold the trained adapters and head, not the 4-bit base."""
    _, _, _, actors = plan
    state = actors.state_dict()
    trainable = {n for n, p in actors.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    changed = {k: v + 1.0 for k, v in state.items()}
    result = actors.load_state_dict(changed, strict=True)  # the frozen tensors' absence is not an error
    assert not result.missing_keys and not result.unexpected_keys
    for name, p in actors.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), changed[name])
    actors.load_state_dict(state)


def test_reward_head_and_adapters_train_in_float32_on_a_bf16_base(tmp_path, monkeypatch):
    """On a GPU the base computes in bf16. The reward model's head and adapters must still be float32: at the reward
    model's learning rate (5e-5) Adam's steps are below bf16's resolution for the head's weights."""
    from salsa.models import qlora
    from salsa.stages.rm import RewardModule

    monkeypatch.setattr(qlora, "compute_dtype", lambda device: torch.bfloat16)  # as on a GPU
    ckpt = tiny_checkpoint(tmp_path / "base", "gemma")
    settings = BaseSettings(str(ckpt), quant="none", gradient_checkpointing=False,
                            lora=LoraSettings(r=2, target_modules=TARGETS))  # fmt: skip
    torch.manual_seed(0)
    _, adapter = new_adapter_model(settings, "cpu", scalar_head=True)
    model = adapter.get_base_model()
    assert next(p for n, p in model.named_parameters() if "embed" in n).dtype == torch.bfloat16  # the base
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and all(p.dtype == torch.float32 for p in trainable.values())
    head = {n: p.detach().clone() for n, p in trainable.items() if "score" in n}
    module = RewardModule(model, lr=5e-5, warmup_steps=0, total_steps=10)
    opt = module.configure_optimizers()["optimizer"]
    seq = torch.randint(6, 40, (4, 9))
    for _ in range(3):
        r_chosen, r_rejected = module({"input_ids": seq, "attention_mask": torch.ones_like(seq)})
        (-(r_chosen - r_rejected).sigmoid().log().mean() + r_chosen.pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()
    changed = [(trainable[n].detach() != w).float().mean().item() for n, w in head.items()]
    assert min(changed) > 0.9  # (nearly) every head weight moved; in bf16 almost none would


@pytest.mark.parametrize("other", [False, True], ids=["ref=start", "ref=other"])
def test_merged_start_equals_the_adapter_form(tmp_path, other):
    """`ppo.merge_start` on a plain-weight base: the policy's start folded into the weights gives the same four
    models as the adapter form (float tolerance), before and after an identical update, with fewer adapters on the
    policy and the reference; the saved policy is the same plain peft adapter on the unmerged base."""
    from salsa.models.actors import response_logits

    ckpt = tiny_checkpoint(tmp_path / "base", "llama")
    ingredients = _ingredients(ckpt, tmp_path)
    soup_lora_adapters(ingredients, tmp_path / "soup")
    rm = _entry("rm", _reward_adapter(ckpt, tmp_path / "rm"))
    start = _entry("sft", ingredients[0]) if other else _entry("soup", tmp_path / "soup")
    ref = _entry("sft", ingredients[1]) if other else start
    settings = _settings(ckpt, quant="none")
    plain, merged = (build_adapter_actors(settings, start, ref, rm, "cpu", merge_start=m) for m in (False, True))
    trained = dict(plain.shared.named_parameters())
    for name, param in merged.shared.named_parameters():  # the same fresh policy adapter (its A is random)
        if param.requires_grad:
            param.data.copy_(trained[name])
    assert merged.policy.names == ("policy",) and len(plain.policy.names) == 2
    assert merged.reference.names == (("start_negated", f"sft_{ref.key}") if other else ())
    seq, mask, p = _batch(plain)

    def outputs(actors):
        with torch.no_grad():
            return [
                actors.policy_logits(seq, mask, p), actors.reference_logits(seq, mask, p),
                actors.values(seq, mask, p), actors.scores(seq, mask, mask[:, p:]),
            ]  # fmt: skip

    for got, want in zip(outputs(merged), outputs(plain), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for actors in (plain, merged):  # one identical step on each
        _one_step(actors, seq, mask, p)
    after = outputs(merged)
    for got, want in zip(after, outputs(plain), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (after[0] - after[1]).abs().max() > 1e-4  # the policy moved, the comparison is not of two starts

    merged.save_policy(tmp_path / "policy")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt), tmp_path / "policy").eval()
    with torch.no_grad():
        torch.testing.assert_close(response_logits(reloaded, seq, mask, p), after[0], rtol=1e-4, atol=1e-4)


def test_merging_needs_plain_weights(plan):
    _, ingredients, _, actors = plan
    actors.shared.load_adapter("extra", ingredients[0])
    with pytest.raises(AdapterError, match="model.quant=none"):
        actors.shared.merge_adapter("extra")
    actors.shared._remove("extra")
