"""Which kernel a 4-bit layer computes with on a CPU, made explicit and checked against the float layer.

bitsandbytes has two CPU kernels for a 4-bit layer (`salsa.models.qlora.CPU_4BIT_KERNELS`):
- float32: dequantise the weight to float32 and multiply in float32. Every CPU; also every forward with gradients.
- avx512bf16: at the first eval-mode forward without gradients, repack the weight into another layout (its block
  scales rounded to bf16) and from then on multiply in bf16 with float32 accumulation, rounding the output to bf16.
  bitsandbytes registers this kernel at import, and takes it by itself, only on CPUs with AVX512-BF16.

Tolerances are derived from the arithmetic, not tuned. For y = x·wᵀ over K terms, with every rounding of a
product's operands and of the result relative (at most u each) and a float32 sum in any order (at most
γ_K = K·2⁻²⁴ / (1 − K·2⁻²⁴) of the sum of absolute terms), the computed y differs from the exact one by at most
((1 + u)^m · (1 + γ_K) − 1) · Σ|x_k·w_k|, m the number of roundings on the way:
- float32 kernel: u = 2⁻²⁴, m = 1 (the dequantised weight, code × scale, rounded once);
- avx512bf16 kernel: u = 2⁻⁸, m = 4 (x to bf16, the scale to bf16, the weight to bf16, the output to bf16).
The float reference is the float32 layer whose weight is the 4-bit weight dequantised in float64.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM

from salsa.models.qlora import (
    AdapterError,
    BaseSettings,
    LoraSettings,
    cpu_4bit_kernel,
    cpu_has_avx512bf16,
    load_base,
    quantization_config,
    set_cpu_4bit_kernel,
)
from tests.hub_fixtures import tiny_checkpoint

BF16_CPU = cpu_has_avx512bf16()
needs_bf16_cpu = pytest.mark.skipif(
    not BF16_CPU, reason="this CPU lacks AVX512-BF16, so bitsandbytes has no avx512bf16 kernel here"
)


def rounding_bound(abs_dot: torch.Tensor, k: int, unit: float, roundings: int) -> torch.Tensor:
    """The largest error of a K-term dot product computed with `roundings` relative roundings of at most `unit`
    each and a float32 sum, given Σ|x_k·w_k| (the module docstring derives it)."""
    gamma = k * 2.0**-24 / (1 - k * 2.0**-24)
    return ((1 + unit) ** roundings * (1 + gamma) - 1) * abs_dot


BOUNDS = {"float32": (2.0**-24, 1), "avx512bf16": (2.0**-8, 4)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("k") / "base", "gemma")


def _project_base(ckpt):
    lora = LoraSettings(r=2, target_modules=["q_proj"])
    return load_base(BaseSettings(str(ckpt), quant="nf4", gradient_checkpointing=False, lora=lora), "cpu")


def _plain_base(ckpt):
    """A 4-bit base loaded with plain transformers, as a user's own script would: bitsandbytes' own choice."""
    return AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quantization_config("nf4", torch.float32))


def _layers(model) -> dict[str, Linear4bit]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}


def _float_weight(layer: Linear4bit) -> torch.Tensor:
    state = layer.weight.quant_state
    assert not getattr(state, "packing_format_for_cpu", False)
    return bnbf.dequantize_4bit(layer.weight.data, state).double()


def _inputs(layer: Linear4bit, rows: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(layer.in_features)
    return torch.randn(rows, layer.in_features, generator=g)


def _errors(kernel: str, got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """(largest error / its bound, largest error / the float32 kernel's bound) over the output's elements."""
    exact = x.double() @ weight.T
    abs_dot = x.double().abs() @ weight.abs().T
    err = (got.double() - exact).abs()
    bound = rounding_bound(abs_dot, x.shape[-1], *BOUNDS[kernel])
    return (err / bound).max().item(), (err / rounding_bound(abs_dot, x.shape[-1], *BOUNDS["float32"])).max().item()


def test_bitsandbytes_picks_the_kernel_by_cpu_and_the_project_always_takes_float32(ckpt):
    plain = _plain_base(ckpt)
    assert cpu_4bit_kernel(plain) == ("avx512bf16" if BF16_CPU else "float32")  # what a plain load does here
    assert cpu_4bit_kernel(_project_base(ckpt)) == "float32"
    set_cpu_4bit_kernel(plain, "float32")
    assert cpu_4bit_kernel(plain) == "float32"
    assert cpu_4bit_kernel(torch.nn.Linear(2, 2)) is None
    with pytest.raises(AdapterError, match="must be one of"):
        set_cpu_4bit_kernel(plain, "int8")
    if not BF16_CPU:
        with pytest.raises(AdapterError, match="lacks AVX512-BF16"):
            set_cpu_4bit_kernel(plain, "avx512bf16")


@pytest.mark.parametrize("kernel", ["float32", pytest.param("avx512bf16", marks=needs_bf16_cpu)])
@torch.no_grad()
def test_each_kernel_is_within_its_bound_of_the_float_layer(ckpt, kernel):
    model = _project_base(ckpt).eval()
    layers = _layers(model)
    weights = {name: _float_weight(layer) for name, layer in layers.items()}
    set_cpu_4bit_kernel(model, kernel)
    worst, worst_vs_float32 = 0.0, 0.0
    for name, layer in layers.items():
        x = _inputs(layer)
        ratio, vs_float32 = _errors(kernel, layer(x), x, weights[name])
        worst, worst_vs_float32 = max(worst, ratio), max(worst_vs_float32, vs_float32)
        assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) == (kernel == "avx512bf16")
    assert worst <= 1.0, f"{kernel}: an output is {worst:.2f}x its rounding bound away from the float layer"
    if kernel == "avx512bf16":  # the kernels differ measurably: bf16 arithmetic is outside float32's bound
        assert worst_vs_float32 > 1.0
    if kernel == "avx512bf16":  # the repack rounded the scales to bf16: no way back to the loaded model
        with pytest.raises(AdapterError, match="already repacked"):
            set_cpu_4bit_kernel(model, "float32")


@torch.no_grad()
def test_the_bf16_bound_holds_for_bf16_arithmetic_on_any_cpu(ckpt):
    """The avx512bf16 kernel's arithmetic, written out in torch (operands rounded to bf16, float32 sums, output
    rounded to bf16), so that the bound the test above applies on AVX512-BF16 CPUs is checked on every CPU."""
    worst, worst_vs_float32 = 0.0, 0.0
    for layer in _layers(_project_base(ckpt)).values():
        weight, x = _float_weight(layer), _inputs(layer)
        got = (x.bfloat16().float() @ weight.float().bfloat16().float().T).bfloat16()  # three of the four roundings
        ratio, vs_float32 = _errors("avx512bf16", got, x, weight)
        worst, worst_vs_float32 = max(worst, ratio), max(worst_vs_float32, vs_float32)
    assert worst <= 1.0 < worst_vs_float32


def test_a_repacked_layer_is_refused_on_any_cpu(ckpt):
    """The repack is plain tensor code and runs on every CPU: a layer packed as a bf16 CPU's first no-grad forward
    would pack it cannot be switched back, because packing rounded its block scales to bf16 (measured: unpacking
    gives the same 4-bit codes but weights up to 0.45% off)."""
    model = _project_base(ckpt)
    name, layer = next(iter(_layers(model).items()))
    codes, weight = layer.weight.data.clone(), _float_weight(layer)
    layer.weight.data, layer.weight.quant_state = bnbf._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    assert cpu_4bit_kernel(model) == "mixed"  # one layer repacked, the others not
    with pytest.raises(AdapterError, match=f"layer {name} was already repacked"):
        set_cpu_4bit_kernel(model, "float32")
    data, state = bnbf._convert_weight_packed_for_cpu_inverse(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(data, codes)
    assert not torch.equal(bnbf.dequantize_4bit(data, state).double(), weight)


def test_the_project_base_never_repacks_even_where_bitsandbytes_would(ckpt, monkeypatch):
    """Where bitsandbytes would take avx512bf16 (the flag it sets when a layer is built, forced here on every CPU),
    the project's base still computes a no-grad eval forward as the training forward does, layout unchanged."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model = _project_base(ckpt)
    seq = torch.randint(3, 40, (2, 8))
    model.train()
    with_grad = model(input_ids=seq).logits.detach()
    model.eval()
    with torch.no_grad():
        rollout = model(input_ids=seq).logits
    assert cpu_4bit_kernel(model) == "float32"
    torch.testing.assert_close(rollout, with_grad, rtol=1e-5, atol=1e-5)
