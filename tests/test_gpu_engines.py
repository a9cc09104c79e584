"""The merged bf16 sampler on a GPU (`rollout=hf_merged`; `pytest -m gpu`, skipped without CUDA): a plain model and
adapters on a 4-bit base, sampled from their merged bf16 copy and rescored by the training model. It prints the
agreement of greedy answers and the log-prob gap, the figures the docs' GPU rows need."""

import json

import pytest
import torch

from salsa.models.actors import response_logits
from salsa.models.engines import MergedHFEngine
from salsa.models.generation import encode_prompts, sample
from salsa.models.hf import load_tokenizer
from tests.hub_fixtures import adapter_view, tiny_checkpoint

pytestmark = pytest.mark.gpu

PROMPTS = ["how do i bake bread", "write a poem about the sea", "explain why the sky is blue", "hello"] * 4


def _gap_and_agreement(model, tok):
    query, qmask = encode_prompts(tok, PROMPTS, 16, "cuda")
    engine = MergedHFEngine(model)
    assert engine.copy.dtype == torch.bfloat16 and next(engine.copy.parameters()).is_cuda
    engine.sync(model)
    greedy = engine.sample(tok, query, qmask, 12, do_sample=False)
    own = sample(model, tok, query, qmask, 12, do_sample=False)
    width = min(greedy.response.size(1), own.response.size(1))
    agreement = (greedy.response[:, :width] == own.response[:, :width]).all(1).float().mean().item()
    torch.manual_seed(0)
    drawn = engine.sample(tok, query, qmask, 12, temperature=1.0)
    with torch.no_grad():
        logits = response_logits(model, drawn.sequences, drawn.attention_mask, query.size(1)).float()
    trainer = torch.log_softmax(logits, -1).gather(2, drawn.response[..., None])[..., 0] * drawn.response_mask
    gap = ((drawn.logprobs - trainer).abs() * drawn.response_mask).sum() / drawn.response_mask.sum()
    return agreement, gap.item()


def test_merged_bf16_copy_of_a_full_model(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt).cuda().eval()
    agreement, gap = _gap_and_agreement(model, load_tokenizer(ckpt))
    print(json.dumps({"model": "full float32", "greedy_agreement": agreement, "mean_logprob_gap": gap}))
    assert gap < 0.1  # bf16 rounding of a float32 model's log-probs


def test_merged_bf16_copy_of_adapters_on_a_4bit_base(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    _, view = adapter_view(ckpt, "nf4", ["start", "delta"], 0.05, seed=1, device="cuda")
    agreement, gap = _gap_and_agreement(view, load_tokenizer(ckpt))
    print(json.dumps({"model": "nf4 + 2 adapters", "greedy_agreement": agreement, "mean_logprob_gap": gap}))
    assert gap < 0.1
