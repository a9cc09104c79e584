"""Two-process DDP on CPU (gloo) through the real entry point: rank 0 alone publishes, replicas agree."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _train(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_sft_rm_ppo_and_eval_under_two_process_ddp(tmp_path):
    """Rank 0 publishes each stage once; rank 1 trains alongside in scratch. The evaluation is not split: every rank
    answers every held-out prompt (rank 1 in scratch, publishing nothing), so what rank 0 publishes is complete and
    is what one process makes of the same models."""
    args = [
        "debug=default", "ref=sft", "stage=eval", "logger=none", "extras.torch_threads=1", "data.task.n_pretrain=64",
        "ppo.iterations=2",
    ]  # fmt: skip
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "extras.keep_rank_outputs=true"]
    done = _train(*args, *ddp, f"paths.log_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]

    cache = tmp_path / "cache"
    builds = [json.loads(line) for line in (cache / "builds.jsonl").read_text().splitlines()]
    assert sorted(b["stage"] for b in builds) == ["base", "eval", "ppo", "rm", "sft"]  # each published once, by rank 0
    for stage in ("base", "sft", "rm", "ppo", "eval"):
        (published,) = [p for p in (cache / stage).iterdir() if p.is_dir() and "." not in p.name]
        replica = cache / stage / f"{published.name}.rank0-1" / "manifest.json"
        assert replica.is_file(), f"rank 1 did not train {stage} alongside rank 0"
        ours = json.loads((published / "manifest.json").read_text())["metrics"]
        theirs = json.loads(replica.read_text())["metrics"]
        # base/SFT: each rank computes the held-out loss of its own replica on all of the held-out data, so equal
        # losses mean equal weights (gradients were averaged although the ranks saw different batches);
        # RM/PPO: logged metrics are reduced across ranks, so both ranks record the same values;
        # eval: every rank answers every held-out prompt with the same models and seed
        assert ours == pytest.approx(theirs, rel=1e-6), stage
        assert all(math.isfinite(v) for v in ours.values())

    # the evaluation rank 0 published is the whole one: what one process makes of the same models
    (evaluated,) = [p for p in (cache / "eval").iterdir() if p.is_dir() and "." not in p.name]
    alone = tmp_path / "alone"
    shutil.copytree(cache, alone / "cache", ignore=shutil.ignore_patterns("*.lock", "eval"))
    done = _train(*args, f"paths.log_dir={alone}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads(line)["stage"] for line in (alone / "cache" / "builds.jsonl").read_text().splitlines()] == [
        b["stage"] for b in builds
    ] + ["eval"]  # only the evaluation was built again
    single = alone / "cache" / "eval" / evaluated.name
    ours, theirs = (json.loads((p / "manifest.json").read_text())["results"] for p in (evaluated, single))
    assert ours.keys() == theirs.keys()
    numbers = {k for k, v in theirs.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    assert {k: ours[k] for k in numbers} == pytest.approx({k: theirs[k] for k in numbers}, rel=1e-6)
    assert {k: ours[k] for k in ours.keys() - numbers} == {k: theirs[k] for k in theirs.keys() - numbers}
    assert ours["comparisons"] == 16  # data.task.n_eval_prompts × eval.samples_per_prompt at debug sizes
    rows = (evaluated / "generations.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 16  # the policy and SFT ingredient 0 (ref=sft: the policy is the baseline)
    assert rows == (single / "generations.csv").read_text().splitlines()


@pytest.mark.parametrize("algo", ["dpo", "grpo", "rloo"])
def test_dpo_grpo_and_rloo_under_two_process_ddp(algo, tmp_path):
    """Each rank takes its own rows (DPO: its slice of every batch of pairs; GRPO, RLOO: its own prompts, k answers
    each); gradients are averaged, so both replicas end equal: DPO's held-out pair metrics (computed by each rank on
    its own replica over all held-out pairs) and GRPO's and RLOO's logged metrics (reduced across ranks) agree."""
    steps = f"{algo}.iterations=2" if algo != "dpo" else "dpo.batch_size=16"
    cmd = [
        sys.executable, str(ROOT / "src" / "train.py"), "debug=default", "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", "ref=soup2", "stage=ppo", f"algo={algo}", steps, "logger=none",
        f"paths.log_dir={tmp_path}", "extras.keep_rank_outputs=true", "extras.torch_threads=1",
        "data.task.n_pretrain=64",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    cache = tmp_path / "cache"
    published = [p for p in (cache / algo).iterdir() if p.is_dir() and "." not in p.name]
    assert len(published) == 2  # the soup2 run and its ref=sft baseline, each published once, by rank 0
    for policy in published:
        replica = cache / algo / f"{policy.name}.rank0-1" / "manifest.json"
        assert replica.is_file(), f"rank 1 did not train {algo} alongside rank 0"
        ours = json.loads((policy / "manifest.json").read_text())["metrics"]
        theirs = json.loads(replica.read_text())["metrics"]
        assert ours == pytest.approx(theirs, rel=1e-5)
        assert all(math.isfinite(v) for v in ours.values())
