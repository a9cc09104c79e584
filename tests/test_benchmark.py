"""The GPU benchmark script runs end to end at toy sizes on CPU (the GPU run uses the same code)."""

import importlib.util
import math

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_benchmark_script_runs_tiny(capsys):
    spec = importlib.util.spec_from_file_location("gpu_gemma2b_ppo", ROOT / "benchmarks" / "gpu_gemma2b_ppo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--iterations", "2"])
    assert result["device"] == "cpu" and len(result["iteration_s"]) == 2
    assert result["tokens_per_s"] > 0 and math.isfinite(result["final_stats"]["ppo/value_loss"])
    assert '"tokens_per_s"' in capsys.readouterr().out
