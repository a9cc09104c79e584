"""Soups: exact (weighted) means of full checkpoints, exact LoRA delta averages, clear errors for bad ingredients."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GemmaConfig, GemmaForCausalLM

from salsa.merge.soup import (
    SoupError,
    accumulate,
    concat_lora,
    greedy_soup,
    normalize_weights,
    soup_checkpoints,
    soup_lora_adapters,
    write_safetensors_streamed,
)


def _config(hidden=32, **kw):
    return GemmaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=32,
        **kw,
    )


def _checkpoint(path, seed, hidden=32, shard=None):
    torch.manual_seed(seed)
    model = GemmaForCausalLM(_config(hidden))
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def _state(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update of one LoRA module: scale · B @ A  (A: r×in, B: out×r)."""
    return scale * (b.float() @ a.float())


def test_normalize_weights():
    assert normalize_weights(None, 4) == [0.25] * 4
    assert normalize_weights([2, 1, 1], 3) == [0.5, 0.25, 0.25]
    for bad in ([1, -1, 0], [0, 0, 0], [1, float("nan"), 1], [1, 2]):
        with pytest.raises(SoupError):
            normalize_weights(bad, 3)
    with pytest.raises(SoupError, match="at least 2"):
        normalize_weights(None, 1)


def test_accumulate_hand_case():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    acc = accumulate(None, a, 0.75)
    assert torch.equal(acc, torch.tensor([0.75, 1.5])) and acc.data_ptr() != a.data_ptr()  # never a's memory
    assert torch.equal(accumulate(acc, b, 0.25), torch.tensor([1.5, 3.0])) and torch.equal(a, torch.tensor([1.0, 2.0]))
    # bf16 ingredients are summed in float32 (0.5 · 1 + 0.5 · 3 in bf16 would also be exact; 1/3 is not)
    third = accumulate(accumulate(accumulate(None, a.bfloat16(), 1 / 3), a.bfloat16(), 1 / 3), a.bfloat16(), 1 / 3)
    assert third.dtype == torch.float32
    torch.testing.assert_close(third, a, rtol=1e-6, atol=0)
    assert accumulate(None, a.double(), 0.5).dtype == torch.float64


@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2]])
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_full_soup_is_exact_weighted_mean(tmp_path, weights, shard):
    paths = [_checkpoint(tmp_path / f"m{i}", seed=i, shard=shard) for i in range(3)]
    if shard:
        assert (paths[0] / "model.safetensors.index.json").exists()
    w = soup_checkpoints(paths, tmp_path / "soup", weights)
    states = [_state(p) for p in paths]
    soup = _state(tmp_path / "soup")
    assert set(soup) == set(states[0])
    for name, t in soup.items():
        expected = sum(wi * s[name].double() for wi, s in zip(w, states, strict=True))
        torch.testing.assert_close(t.double(), expected, rtol=1e-6, atol=1e-7)
    # the soup loads with plain transformers
    GemmaForCausalLM.from_pretrained(tmp_path / "soup")


def test_mismatched_ingredients_are_rejected(tmp_path):
    a = _checkpoint(tmp_path / "a", 0)
    wide = _checkpoint(tmp_path / "wide", 1, hidden=48)
    with pytest.raises(SoupError, match="architecture"):
        soup_checkpoints([a, wide], tmp_path / "s1")

    missing = _checkpoint(tmp_path / "missing", 2)
    state = load_file(missing / "model.safetensors")
    state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SoupError, match="tensor names"):
        soup_checkpoints([a, missing], tmp_path / "s2")

    reshaped = _checkpoint(tmp_path / "reshaped", 3)
    state = load_file(reshaped / "model.safetensors")
    state["model.norm.weight"] = torch.zeros(7)
    save_file(state, reshaped / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SoupError, match="shape of model.norm.weight"):
        soup_checkpoints([a, reshaped], tmp_path / "s3")

    truncated = _checkpoint(tmp_path / "truncated", 4)
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SoupError, match="unreadable"):
        soup_checkpoints([a, truncated], tmp_path / "s4")

    with pytest.raises(SoupError, match="no config.json"):
        soup_checkpoints([a, tmp_path], tmp_path / "s5")
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text((a / "config.json").read_text())
    with pytest.raises(SoupError, match="no model.safetensors"):
        soup_checkpoints([a, tmp_path / "weightless"], tmp_path / "s6")


def test_concat_lora_hand_case():
    a1, b1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]])
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [4.0]])
    a, b = concat_lora([(a1, b1, 1.0), (a2, b2, 0.5)], [0.5, 0.5])
    # 0.5 * 1.0 * b1@a1 + 0.5 * 0.5 * b2@a2
    assert torch.equal(b @ a, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(lora_delta(a, b, 1.0), b @ a)


def _lora_ingredients(tmp_path, n=3, ranks=(4, 4, 8)):
    torch.manual_seed(0)
    base = GemmaForCausalLM(_config())
    base.save_pretrained(tmp_path / "base")
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(
            r=ranks[i],
            lora_alpha=2 * ranks[i],
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
            use_rslora=(i == 2),
        )
        model = get_peft_model(GemmaForCausalLM.from_pretrained(tmp_path / "base"), cfg)
        model.save_pretrained(tmp_path / f"adapter{i}")
        paths.append(tmp_path / f"adapter{i}")
    return tmp_path / "base", paths


@torch.no_grad()
def test_lora_soup_equals_base_plus_mean_delta(tmp_path):
    base_dir, adapters = _lora_ingredients(tmp_path)
    soup_lora_adapters(adapters, tmp_path / "soup")
    x = torch.randint(0, 64, (2, 10))

    soup_model = PeftModel.from_pretrained(GemmaForCausalLM.from_pretrained(base_dir), tmp_path / "soup").eval()
    got = soup_model(x).logits

    # expected: the base with the mean of the ingredients' merged weights
    merged = [
        PeftModel.from_pretrained(GemmaForCausalLM.from_pretrained(base_dir), a).merge_and_unload().state_dict()
        for a in adapters
    ]
    expected_model = GemmaForCausalLM.from_pretrained(base_dir).eval()
    expected_model.load_state_dict({k: sum(m[k] for m in merged) / len(merged) for k in merged[0]})
    torch.testing.assert_close(got, expected_model(x).logits, rtol=1e-4, atol=1e-5)

    # averaging the A and B factors separately is a different (wrong) model
    factors = [load_file(a / "adapter_model.safetensors") for a in adapters[:2]]
    naive = {k: (factors[0][k] + factors[1][k]) / 2 for k in factors[0]}
    (tmp_path / "naive").mkdir()
    save_file(naive, tmp_path / "naive" / "adapter_model.safetensors")
    (tmp_path / "naive" / "adapter_config.json").write_text((adapters[0] / "adapter_config.json").read_text())
    soup_lora_adapters(adapters[:2], tmp_path / "soup2")
    naive_model = PeftModel.from_pretrained(GemmaForCausalLM.from_pretrained(base_dir), tmp_path / "naive").eval()
    soup2_model = PeftModel.from_pretrained(GemmaForCausalLM.from_pretrained(base_dir), tmp_path / "soup2").eval()
    assert (naive_model(x).logits - soup2_model(x).logits).abs().max() > 1e-3


def test_lora_soup_rejects_different_bases_and_modules(tmp_path):
    _, adapters = _lora_ingredients(tmp_path)
    cfg = json.loads((adapters[1] / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some/other-model"
    (adapters[1] / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SoupError, match="different bases"):
        soup_lora_adapters(adapters, tmp_path / "soup")
    with pytest.raises(SoupError, match="not a peft adapter"):
        soup_lora_adapters([adapters[0], tmp_path], tmp_path / "soup")


def test_greedy_soup_keeps_only_improving_ingredients():
    # toy held-out loss: a soup's loss is the mean of its members' values, except "c" which spoils any soup
    value = {"a": 1.0, "b": 2.0, "c": 1.5, "d": 3.0}

    def score(members):
        loss = sum(value[m] for m in members) / len(members) - 0.8 * (len(members) - 1)
        return loss + (5.0 if "c" in members and len(members) > 1 else 0.0)

    chosen, history = greedy_soup(list(value), score)
    # ranked a(1.0) c(1.5) b(2.0) d(3.0): c rejected, b accepted (0.7), d accepted (2.0 - 1.6 = 0.4)
    assert chosen == ["a", "b", "d"]
    assert history == pytest.approx([1.0, 0.7, 0.4])


def _mixed_tensors():
    torch.manual_seed(0)
    return {
        "w.f32": torch.randn(3, 5),
        "w.bf16": torch.randn(4, 2).bfloat16(),
        "w.f16": torch.randn(7).half(),
        "w.f64": torch.randn(2, 2, 2).double(),
        "ids.i64": torch.arange(6).reshape(2, 3),
        "flag.bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_streamed_writer_round_trips_through_safetensors(tmp_path):
    tensors = _mixed_tensors()
    specs = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    write_safetensors_streamed(tmp_path / "ours.safetensors", specs, iter(tensors.values()), {"format": "pt"})
    back = load_file(tmp_path / "ours.safetensors")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    header_len = int.from_bytes((tmp_path / "ours.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0
    with pytest.raises(ValueError, match="expected"):
        write_safetensors_streamed(tmp_path / "bad.safetensors", specs[:1], [torch.zeros(2)])


def test_full_soup_of_differently_sharded_ingredients(tmp_path):
    """Each ingredient is read from its own shard of each tensor; the output keeps the first one's sharding."""
    paths = [_checkpoint(tmp_path / "m0", 0, shard="40KB"), _checkpoint(tmp_path / "m1", 1)]
    soup_checkpoints(paths, tmp_path / "soup")
    states = [_state(p) for p in paths]
    soup = _state(tmp_path / "soup")
    out_files = sorted(f.name for f in (tmp_path / "soup").glob("*.safetensors"))
    assert out_files == sorted(f.name for f in paths[0].glob("*.safetensors")) and len(out_files) > 1
    for name, t in soup.items():
        torch.testing.assert_close(t.double(), (states[0][name].double() + states[1][name].double()) / 2)


def test_full_soup_of_mixed_dtypes_copies_equal_integers_and_refuses_differing_ones(tmp_path):
    """Float tensors of any precision are averaged (returned in their own dtype); integer and bool buffers must
    agree between ingredients and are copied, whatever file of the ingredient holds them."""
    states = []
    for i in range(2):
        torch.manual_seed(i)
        state = _mixed_tensors()
        states.append(state)
        (tmp_path / f"m{i}").mkdir()
        (tmp_path / f"m{i}" / "config.json").write_text(json.dumps({"model_type": "gemma"}))
        save_file(state, tmp_path / f"m{i}" / "model.safetensors", metadata={"format": "pt"})
    soup_checkpoints([tmp_path / "m0", tmp_path / "m1"], tmp_path / "soup")
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    for name, t in soup.items():
        a, b = states[0][name], states[1][name]
        assert t.dtype == a.dtype, name
        if a.dtype.is_floating_point:
            torch.testing.assert_close(t, ((a.double() + b.double()) / 2).to(a.dtype), rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(t, a), name
    states[1]["ids.i64"] = states[1]["ids.i64"] + 1
    save_file(states[1], tmp_path / "m1" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SoupError, match="ids.i64 differs"):
        soup_checkpoints([tmp_path / "m0", tmp_path / "m1"], tmp_path / "soup2")
