"""The GRPO/RLOO throughput benchmark: its FLOP accounting and TRL settings mapping by hand, its phase clock, and a
smoke run of our side (timings are the benchmark's business, not the tests')."""

import json
import subprocess
import sys

import pytest

from benchmarks.group_throughput import GroupClock, compare, count, group_phase_flops, ratio
from benchmarks.trl_group import trl_settings
from tests.conftest import ROOT

# hidden 2, MLP 3, one layer, one head of width 2 (and one KV head), vocabulary 5: per position 34 MACs in the
# projections and MLP, plus 2 · 2 · context in attention scores and values; the LM head adds 2 · 5 = 10
ARCH = {
    "hidden_size": 2,
    "intermediate_size": 3,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 2,
}


def test_group_phase_flops_hand_case():
    # one answer, prompt 1, answer 2: sequences of 3 positions, average causal context 2
    f = group_phase_flops(ARCH, vocab=5, samples=1, prompt_len=1, response_len=2, epochs=2)
    policy = 2 * (3 * (34 + 4 * 2) + 2 * 10)  # all 3 positions, the LM head at the 2 answer positions
    assert f["logprobs"] == policy == 292  # the reference's pass
    assert f["reward"] == 2 * 3 * (34 + 4 * 2) == 252  # a backbone over all 3 positions, no LM head
    assert f["update"] == 2 * 3 * policy  # 2 epochs of forward + backward (twice the forward)
    # generation: the 2 positions that predict an answer token, context 1.5 on average, LM head at both
    assert f["generation"] == 2 * (2 * (34 + 4 * 1.5) + 2 * 10) == 200


def test_group_phase_flops_scales_and_drops_the_reference():
    one = group_phase_flops(ARCH, vocab=5, samples=1, prompt_len=1, response_len=2, epochs=1)
    four = group_phase_flops(ARCH, vocab=5, samples=4, prompt_len=1, response_len=2, epochs=1)
    assert all(four[k] == 4 * one[k] for k in one)  # linear in the number of answers
    no_kl = group_phase_flops(ARCH, vocab=5, samples=1, prompt_len=1, response_len=2, epochs=1, reference=False)
    assert no_kl["logprobs"] == 0.0 and no_kl["update"] == one["update"]


def _settings(**overrides):
    s = {
        "batch_size": 16, "group_size": 4, "num_minibatches": 2, "epochs": 3, "response_length": 40,
        "temperature": 0.7, "kl_coef": 0.05, "clip": 0.2, "lr": 1e-4, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "seed": 7, "scale_rewards": True, "loss_aggregation": "token", "normalize_advantages": False,
    }  # fmt: skip
    return {**s, **overrides}


def test_trl_settings_map_an_iteration_onto_trl_steps(tmp_path):
    t = trl_settings("grpo", _settings(), iterations=5, output_dir=tmp_path)
    # 64 answers in 2 minibatches of 32, one optimizer step each, 3 passes: one rollout feeds 2 × 3 = 6 steps
    assert t["per_device_train_batch_size"] == 32 and t["gradient_accumulation_steps"] == 1
    assert t["steps_per_generation"] == 2 and t["num_iterations"] == 3 and t["num_generations"] == 4
    assert t["max_steps"] == 5 * 6
    assert (t["max_completion_length"], t["temperature"], t["beta"], t["epsilon"]) == (40, 0.7, 0.05, 0.2)
    assert (t["learning_rate"], t["max_grad_norm"], t["seed"], t["adam_epsilon"]) == (1e-4, 1.0, 7, 1e-5)
    assert t["use_cpu"] and not t["bf16"] and not t["gradient_checkpointing"] and t["report_to"] == []
    assert (t["loss_type"], t["scale_rewards"]) == ("bnpo", "group")
    assert "normalize_advantages" not in t


def test_trl_settings_per_algorithm_options(tmp_path):
    grpo = trl_settings("grpo", _settings(loss_aggregation="sequence", scale_rewards=False), 1, tmp_path)
    assert (grpo["loss_type"], grpo["scale_rewards"]) == ("grpo", "none")
    rloo = trl_settings("rloo", _settings(normalize_advantages=True), 1, tmp_path)
    assert rloo["normalize_advantages"] is True and "loss_type" not in rloo and "scale_rewards" not in rloo


def test_group_clock_counts_nested_calls_once_and_skips_gradient_passes():
    clock = GroupClock()
    clock.start()
    inner = clock.timed("reward", lambda: sum(range(10_000)))
    outer = clock.timed("logprobs", lambda: inner())
    outer()
    assert clock.current["logprobs"] > 0 and clock.current["reward"] == 0.0  # the outermost call owns the time
    gated = clock.timed("generation", lambda: sum(range(10_000)), when=lambda: False)
    gated()
    assert clock.current["generation"] == 0.0
    clock.mark_update()
    clock.end_iteration()
    it = clock.iterations[0]
    assert it["iteration"] >= it["logprobs"] + it["update"] and it["cpu_iteration"] > 0


def test_ratios():
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, 0.0) is None
    assert count(978_688) == "1.0M" and count(25_408) == "25k"
    phase = {"tokens_per_s": 100.0, "tokens_per_cpu_s": 50.0}
    summary = {"ours": {p: dict(phase) for p in ("generation", "logprobs", "reward", "update", "other", "iteration")}}
    assert compare(summary) is None  # no TRL side
    summary["trl"] = {p: {"tokens_per_s": 50.0, "tokens_per_cpu_s": 50.0} for p in summary["ours"]}
    assert compare(summary)["iteration"] == {"wall": 2.0, "cpu": 1.0}


@pytest.mark.slow
def test_group_throughput_smoke(tmp_path):
    out = tmp_path / "group.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "group_throughput.py"), "--smoke", "--no-trl", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    algos = results["sizes"]["smoke"]["algos"]
    assert set(algos) == {"grpo", "rloo"}
    for algo, entry in algos.items():
        assert set(entry["summary"]) == {"ours"} and entry["ours_over_trl"] is None, algo
        ours = entry["summary"]["ours"]
        assert ours["iterations_measured"] == 1 and ours["peak_rss_bytes"] > 0
        for phase in ("generation", "logprobs", "reward", "update", "iteration"):
            assert ours[phase]["seconds"] > 0 and ours[phase]["flops_per_s"] > 0, (algo, phase)
        parts = sum(ours[p]["seconds"] for p in ("generation", "logprobs", "reward", "update"))
        assert ours["iteration"]["seconds"] >= 0.99 * parts
        # 2 prompts × 2 answers of at most 6 tokens
        assert ours["shape"]["batch"] == 4 and ours["shape"]["response_len"] <= 6
        assert entry["settings"]["group_size"] == 2
    for header in ("## GRPO, smoke", "## RLOO, smoke", "| logprobs |", "per iteration: ours"):
        assert header in done.stdout, header
