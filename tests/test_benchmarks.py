"""The benchmark scripts: their FLOP accounting by hand, and a smoke run of each on tiny sizes (timings are the
benchmarks' business, not the tests')."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from benchmarks._common import VENVS
from benchmarks.ppo_throughput import lm_forward_flops, phase_flops
from tests.conftest import ROOT

# hidden 2, MLP 3, one layer, one head of width 2 (and one KV head), vocabulary 5
ARCH = {
    "hidden_size": 2,
    "intermediate_size": 3,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 2,
}


def test_lm_forward_flops_hand_case():
    # per position: q 2·2 + k,v 2·(2·2) + o 2·2 + MLP 3·2·3 = 34 MACs, attention 2·2·context = 12 at context 3
    assert lm_forward_flops(ARCH, vocab=5, tokens=1, context=3) == 2 * (34 + 12)
    # the LM head adds hidden · vocab = 10 MACs per position it is applied at
    assert lm_forward_flops(ARCH, vocab=5, tokens=4, context=3, lm_head_tokens=2) == 2 * (4 * 46 + 2 * 10)


def test_phase_flops_hand_case():
    # batch 1, prompt 1, response 2: sequences of 3 positions, average causal context 2
    f = phase_flops(ARCH, vocab=5, batch=1, prompt_len=1, response_len=2, ppo_epochs=2)
    backbone = 3 * 2 * (34 + 2 * 2 * 2)  # 3 positions at context 2
    policy = backbone + 2 * 2 * 10  # the LM head at the 2 response positions
    assert f["scoring"] == policy + 2 * backbone
    assert f["update"] == 2 * 3 * (policy + backbone)
    # generation: the 2 positions that predict a response token, context 1.5 on average, LM head at both
    assert f["generation"] == 2 * 2 * (34 + 2 * 2 * 1.5) + 2 * 2 * 10


def _run(script: str, *args: str, tmp_path) -> dict:
    out = tmp_path / f"{script}.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ppo_throughput_smoke(tmp_path):
    results = _run("ppo_throughput.py", tmp_path=tmp_path)
    summary = results["sizes"]["smoke"]["summary"]
    assert ("trl" in summary) == (VENVS / "trl" / ".installed").exists()
    ours = summary["ours"]
    assert ours["iterations_measured"] == 1 and ours["peak_rss_bytes"] > 0
    for phase in ("generation", "scoring", "update", "iteration"):
        assert ours[phase]["seconds"] > 0 and ours[phase]["flops_per_s"] > 0, phase
    assert ours["iteration"]["seconds"] >= ours["generation"]["seconds"] + ours["update"]["seconds"]
    assert ours["shape"]["batch"] == 4 and ours["shape"]["response_len"] <= 6


@pytest.mark.slow
def test_soup_memory_smoke(tmp_path):
    results = _run("soup_memory.py", tmp_path=tmp_path)["results"]
    assert ("mergekit" in results) == (VENVS / "mergekit" / ".installed").exists()
    for method in ("baseline", "ours", "naive"):
        assert results[method]["seconds"] > 0 and results[method]["peak_rss_bytes"] > 0
    assert results["naive"]["max_abs_diff_vs_ours"] < 1e-6  # the same soup, made another way


@pytest.mark.slow
def test_generation_memory_smoke(tmp_path):
    table = _run("generation_memory.py", tmp_path=tmp_path)
    assert set(table["runs"]) == {"baseline", "kept", "steps"}
    assert all(r["peak_rss"] > 0 for r in table["runs"].values())
    assert table["same_samples"]  # both samplers draw the same tokens under one seed


@pytest.mark.slow
def test_gpu_benchmark_script_runs_tiny(capsys):
    """The GPU benchmark runs end to end at toy sizes on CPU (the GPU run uses the same code)."""
    spec = importlib.util.spec_from_file_location("gpu_gemma2b_ppo", ROOT / "benchmarks" / "gpu_gemma2b_ppo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--iterations", "2"])
    assert result["device"] == "cpu" and len(result["iteration_s"]) == 2
    assert result["tokens_per_s"] > 0 and math.isfinite(result["final_stats"]["ppo/value_loss"])
    assert '"tokens_per_s"' in capsys.readouterr().out


@pytest.mark.slow
def test_sampling_throughput_smoke(tmp_path):
    results = _run("sampling_throughput.py", tmp_path=tmp_path)
    (run,) = results["runs"]["tiny"]
    assert results["machine"]["cores"] > 0 and run["batch"] == 2
    for side in ("eager", "compiled"):
        assert run[side]["seconds"] > 0 and run[side]["tokens_per_s"] > 0, side
    assert run["compile_s"] >= 0 and run["amortised"]["iterations"] == 30


def test_ppo_update_profile_smoke(tmp_path):
    from benchmarks.ppo_update_profile import group_of, main

    assert group_of("aten::mm") == "matmul" and group_of("aten::gelu_backward") == "elementwise"
    out = main(["--smoke", "--warmup", "1", "--json", str(tmp_path / "p.json")])
    assert out["operator_calls"] > 0 and out["groups_s"]["matmul"] > 0
    assert json.loads((tmp_path / "p.json").read_text())["top"][0][1] > 0  # the heaviest operator, in seconds
