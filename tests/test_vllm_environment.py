"""The vLLM tests (tests/test_vllm.py) in the environment that has vLLM: vLLM's CPU build pins its own torch and
transformers, so it lives in a virtual environment of its own (`.venv-vllm`, which .ci/run builds; or the Python
that SALSA_VLLM_PYTHON names), and this test runs them there from the project's one test command."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def vllm_python() -> Path | None:
    named = os.environ.get("SALSA_VLLM_PYTHON")
    path = Path(named) if named else ROOT / ".venv-vllm" / "bin" / "python"
    return path if path.is_file() else None


@pytest.mark.slow
def test_the_vllm_tests_pass_in_the_vllm_environment():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment: tests/test_vllm.py runs here directly")
    python = vllm_python()
    if python is None:
        pytest.skip("no vLLM environment: .ci/run builds .venv-vllm (or set SALSA_VLLM_PYTHON)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-m", "vllm", "-p", "no:cacheprovider", "tests/test_vllm.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    tail = done.stdout[-8000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    summary = done.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 10 and "skipped" not in summary, summary  # ran, not skipped
