"""Reliability: resume after kill -9, concurrent jobs on one cache, one-line rejection of bad input, NaN guard."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from salsa.infra.cache import StageCache
from salsa.infra.guards import NonFiniteError
from salsa.models.actors import FullActors
from salsa.runner import pipeline_job
from tests.conftest import ROOT, make_cfg
from tests.hub_fixtures import ultrafeedback_dir, write_jsonl

pytestmark = pytest.mark.slow
TRAIN = [sys.executable, str(ROOT / "src" / "train.py")]


def _run(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=300, **kw)


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under the cache with a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """A log dir whose cache holds base, SFT ingredients, soup and RM at debug sizes (built once here)."""
    log_dir = tmp_path_factory.mktemp("upstream")
    r = _run([*TRAIN, "debug=default", f"paths.log_dir={log_dir}", "stage=rm"])
    assert r.returncode == 0, r.stderr[-2000:]
    return log_dir


def _copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "cache", dst / "cache", ignore=shutil.ignore_patterns("*.lock"))
    return dst


def _ppo_manifest(log_dir: Path) -> dict:
    (found,) = list((log_dir / "cache" / "ppo").glob("*/manifest.json"))
    return json.loads(found.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------
PPO_ARGS = ["debug=default", "stage=ppo", "ref=sft", "logger=none", "ppo.iterations=14", "ppo.ckpt_every=1"]


def test_kill_mid_ppo_then_rerun_resumes_to_the_same_result(upstream, tmp_path):
    straight = _copy_cache(upstream, tmp_path / "straight")
    r = _run([*TRAIN, *PPO_ARGS, f"paths.log_dir={straight}"])
    assert r.returncode == 0, r.stderr[-2000:]
    expected = _ppo_manifest(straight)["metrics"]

    killed = _copy_cache(upstream, tmp_path / "killed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [*TRAIN, *PPO_ARGS, f"paths.log_dir={killed}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    ckpt = None
    while time.time() < deadline and proc.poll() is None:
        found = list((killed / "cache" / "ppo").glob("*.partial/checkpoints/last.ckpt"))
        if found and torch.load(found[0], weights_only=True, mmap=True)["epoch"] >= 2:  # a few iterations in
            ckpt = found[0]
            break
        time.sleep(0.05)
    assert ckpt is not None, "PPO finished or failed before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((killed / "cache" / "ppo").glob("*/manifest.json"))  # nothing published by the killed run

    r = _run([*TRAIN, *PPO_ARGS, f"paths.log_dir={killed}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr + r.stdout
    got = _ppo_manifest(killed)["metrics"]
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-4), k
    # only PPO was trained by the rerun: the upstream stages were reused, and each stage was built once
    keys = [b["key"] for b in StageCache(killed / "cache").builds()]
    assert len(keys) == len(set(keys))
    assert not list((killed / "cache" / "ppo").glob("*/checkpoints"))  # checkpoints are not kept once published


class Stopped(Exception):
    pass


def test_interrupted_sft_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """An SFT build that dies after its first checkpoint resumes from it and ends with the same weights."""
    from safetensors.torch import load_file

    from salsa.infra import training
    from salsa.infra.context import Context
    from salsa.pipeline import run

    args = ("stage=sft", "ref=sft", "sft.ckpt_every=1", "sft.epochs=2")
    cfg = make_cfg(tmp_path / "straight", *args)
    run(cfg, Context.from_cfg(cfg))

    original = training.AtomicLastCheckpoint.on_train_epoch_end

    def dies_after_second_checkpoint(self, trainer, module):
        original(self, trainer, module)
        if trainer.current_epoch == 1 and "sft" in str(self.dirpath.parent.parent):
            raise Stopped  # as if the process died here

    cfg2 = make_cfg(tmp_path / "resumed", *args)
    monkeypatch.setattr(training.AtomicLastCheckpoint, "on_train_epoch_end", dies_after_second_checkpoint)
    with pytest.raises(Stopped):
        run(cfg2, Context.from_cfg(cfg2))
    monkeypatch.setattr(training.AtomicLastCheckpoint, "on_train_epoch_end", original)
    assert list((tmp_path / "resumed" / "cache" / "sft").glob("*.partial/checkpoints/last.ckpt"))
    run(cfg2, Context.from_cfg(cfg2))

    a = load_file(next((tmp_path / "straight" / "cache" / "sft").glob("*/model.safetensors")))
    b = load_file(next((tmp_path / "resumed" / "cache" / "sft").glob("*/model.safetensors")))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------------------------
def test_failure_after_training_keeps_the_trained_weights(tmp_path, monkeypatch):
    """The held-out loss failing (say, out of memory) after SFT has trained: the rerun restores the trained weights
    from the stage's last checkpoint instead of training again, and the published stage holds no checkpoints."""
    from safetensors.torch import load_file

    from salsa.infra.context import Context
    from salsa.pipeline import run
    from salsa.stages import lm, sft

    cfg = make_cfg(tmp_path, "stage=sft", "ref=sft")
    real = sft.heldout_loss

    def out_of_memory(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(sft, "heldout_loss", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(cfg, Context.from_cfg(cfg))
    (partial,) = (tmp_path / "cache" / "sft").glob("*.partial")
    trained = load_file(partial / "model.safetensors")
    assert (partial / "checkpoints" / "last.ckpt").is_file()

    steps = []
    original_step = lm.SFTModule.training_step
    monkeypatch.setattr(lm.SFTModule, "training_step", lambda self, *a: steps.append(1) or original_step(self, *a))
    monkeypatch.setattr(sft, "heldout_loss", real)
    run(cfg, Context.from_cfg(cfg))
    assert steps == []  # nothing trained again
    (published,) = [p for p in (tmp_path / "cache" / "sft").iterdir() if p.is_dir() and "." not in p.name]
    assert not (published / "checkpoints").exists()
    again = load_file(published / "model.safetensors")
    for k in trained:
        torch.testing.assert_close(again[k], trained[k], rtol=0, atol=0)


def test_four_jobs_at_once_on_a_cold_cache(tmp_path):
    """Overlapping needs (base, SFT ingredients, RM, the PPO baseline): each stage is built exactly once. All four
    ask for the same run directory (as runs started in one second do): each gets its own, nothing is lost."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    refs = ("soup3", "sft", "soup2", "other")
    procs = [
        subprocess.Popen(
            [
                *TRAIN,
                "debug=default",
                "logger=mlflow",
                "extras.torch_threads=1",  # four jobs share two cores
                f"paths.log_dir={tmp_path}",
                f"ref={ref}",
                f"hydra.run.dir=${{salsa.unique_dir:{tmp_path}/runs/same_second}}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ref in refs
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    builds = StageCache(tmp_path / "cache").builds()
    keys = [b["key"] for b in builds]
    assert len(keys) == len(set(keys)), "a stage was built twice"
    stages = [b["stage"] for b in builds]
    assert stages.count("base") == 1 and stages.count("rm") == 1 and stages.count("sft") == 3
    assert stages.count("soup") == 2 and stages.count("ppo") == 4 and stages.count("eval") == 4
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert [d.name for d in run_dirs] == ["same_second", "same_second_2", "same_second_3", "same_second_4"]
    got = {}
    for d in run_dirs:
        ref = json.loads((d / "results.json").read_text())["ref"]
        log_text = (d / "train.log").read_text()
        assert f"results written to {d / 'results.json'}" in log_text  # each run's log is its own
        assert sum(log_text.count(f"results written to {o / 'results.json'}") for o in run_dirs) == 1
        got[ref] = d
    assert sorted(got) == sorted(refs)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("salsa").experiment_id])
    assert sum("mlflow.parentRunId" not in r.data.tags for r in runs) == 4


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    lock = tmp_path / "sft" / "abc.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from filelock import FileLock; import time; l = FileLock({str(lock)!r}); "
            "l.acquire(); print('held', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    cache = StageCache(tmp_path, lock_timeout=20)
    started = time.time()
    entry = cache.get_or_build("sft", {"any": 1}, lambda work: {"ok": True})
    assert entry.manifest["ok"] and time.time() - started < 10


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no traceback, fast, cache untouched
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint directories that are wrong in one way each (and a good one to pair with)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    root = tmp_path_factory.mktemp("checkpoints")

    def model(path: Path, hidden: int = 32) -> Path:
        torch.manual_seed(0)
        GemmaForCausalLM(
            GemmaConfig(
                vocab_size=64,
                hidden_size=hidden,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
            )
        ).save_pretrained(path)
        return path

    out = {"good": model(root / "good"), "wide": model(root / "wide", 48)}
    out["missing"] = model(root / "missing")
    (out["missing"] / "model.safetensors").unlink()
    out["truncated"] = model(root / "truncated")
    blob = (out["truncated"] / "model.safetensors").read_bytes()
    (out["truncated"] / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    out["pickle"] = model(root / "pickle")
    (out["pickle"] / "model.safetensors").rename(out["pickle"] / "pytorch_model.bin")
    # UltraFeedback-format data directories, each wrong in one way
    out["no_split"] = ultrafeedback_dir(root / "no_split", n=4)
    (out["no_split"] / "train_sft.jsonl").unlink()
    out["empty_split"] = ultrafeedback_dir(root / "empty_split", n=4)
    (out["empty_split"] / "test_prefs.jsonl").write_text("")
    out["no_column"] = ultrafeedback_dir(root / "no_column", n=4)
    rows = [json.loads(line) for line in (out["no_column"] / "train_prefs.jsonl").read_text().splitlines()]
    write_jsonl(out["no_column"] / "train_prefs.jsonl", [{k: v for k, v in r.items() if k != "chosen"} for r in rows])
    return out


BAD_INPUTS = {
    # case: (arguments after the entry point, text the one-line error must contain)
    "negative kl_coef": (["ppo.kl_coef=-0.1"], "ppo.kl_coef"),
    "misspelled key": (["ppo.klcoef=0.1"], "ppo.klcoef: no such key (did you mean kl_coef?)"),
    "added unknown key": (["+ppo.klcoef=0.1"], "ppo.klcoef"),
    "wrong type": (["ppo.kl_coef=abc"], "ppo.kl_coef"),
    "nan kl_coef": (["ppo.kl_coef=nan"], "ppo.kl_coef"),
    "unknown ref": (["ref=nope"], "ref=nope is not an option"),
    "unknown model": (["model=nope"], "model=nope is not an option"),
    "unknown data": (["data=nope"], "data=nope is not an option"),
    "soup of one": (["ref=soup3", "ref.ingredients=[1]"], "ref.ingredients"),
    "weights without positive sum": (["soup=weighted", "soup.weights=[1,-1,0]"], "soup.weights"),
    "zero response length": (["ppo.response_length=0"], "ppo.response_length"),
    "batch not divisible": (["ppo.batch_size=10", "ppo.num_minibatches=3"], "ppo.num_minibatches"),
    "batch over 8 processes": (["trainer=ddp", "trainer.devices=8", "sft.batch_size=4"], "sft.batch_size: 4 does not"),
    "missing model dir": (["model.name_or_path=/no/such/dir"], "model.name_or_path"),
    "fsdp with PPO": (["trainer=fsdp"], "trainer.strategy: fsdp cannot run PPO"),
    "zero-3 with PPO": (["trainer=deepspeed", "trainer.strategy=deepspeed_stage_3"], "ZeRO-3 shards every parameter"),
    "sharded 4-bit base": (["model=gemma2b", "trainer=deepspeed"], "cannot shard a 4-bit base"),
    "compile with adapters": (["model=gemma2b", "ppo.compile=true"], "ppo.compile: compiles full-weight models only"),
    "hub id not available offline": (["model.name_or_path=nobody/no-such-model"], "model.name_or_path"),
    "missing safetensors": (["model.name_or_path={missing}"], "no safetensors weights"),
    "truncated safetensors": (["model.name_or_path={truncated}"], "truncated safetensors"),
    "pickle weights": (["model.name_or_path={pickle}"], "pickle weights are not loaded"),
    "missing data dir": (["data=ultrafeedback", "data.path={root}/no/such/dir"], "data.path"),
    "missing data file": (["data=ultrafeedback", "data.path={no_split}"], "no file for split 'train_sft'"),
    "empty data file": (["data=ultrafeedback", "data.path={empty_split}"], "test_prefs.jsonl is empty"),
    "data file lacks a column": (["data=ultrafeedback", "data.path={no_column}"], "no column 'chosen'"),
    "different architectures": (
        [["-m", "salsa.merge.soup", "{good}", "{wide}", "--out", "{root}/soup"]],
        "differ in architecture",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_rejected_in_one_line(case, upstream, bad_checkpoints, tmp_path):
    args, expected = BAD_INPUTS[case]
    files = {k: str(v) for k, v in bad_checkpoints.items()} | {"root": str(tmp_path)}
    before = _snapshot(upstream / "cache")
    if isinstance(args[0], list):  # a command other than the training entry point
        cmd = [sys.executable, *(a.format(**files) for a in args[0])]
    else:
        cmd = [*TRAIN, "debug=default", f"paths.log_dir={upstream}", *(a.format(**files) for a in args)]
    started = time.time()
    r = _run(cmd, cwd=str(ROOT))
    assert time.time() - started < 30
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr
    assert _snapshot(upstream / "cache") == before


@pytest.mark.parametrize(
    "overrides",
    [("trainer=fsdp", "stage=sft"), ("trainer=fsdp", "stage=rm"), ("trainer=deepspeed",), ("trainer=ddp",),
     ("model=gemma2b", "trainer=ddp")],
)  # fmt: skip
def test_strategies_that_can_run_a_run_are_not_refused(overrides, tmp_path):
    """The refusals above are exact: FSDP may train SFT and reward models, ZeRO-2 may run PPO, DDP runs anything."""
    from salsa.validate import check_strategy

    check_strategy(make_cfg(tmp_path, *overrides))


def _refusal(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> tuple[str, float]:
    """The one line a refused command prints and the seconds it took (exit code 2: a config error)."""
    started = time.time()
    r = _run(cmd, env=env, cwd=str(cwd))
    elapsed = time.time() - started
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0], elapsed


# ---------------------------------------------------------------------------------------------------------------
# Experiments kept outside the repository (hydra.searchpath): they run, and their mistakes are one line too
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def external_conf(tmp_path) -> Path:
    """A researcher's own config directory, outside the repository: an experiment, and one with a misspelled key."""
    conf = tmp_path / "my_configs" / "conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "mine.yaml").write_text("# @package _global_\nppo:\n  kl_coef: 0.07\n")
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nppo:\n  kl_cof: 0.07\n")
    return conf


def test_an_experiment_outside_the_repository_runs(external_conf, tmp_path):
    log_dir = tmp_path / "logs"
    args = ["experiment=mine", f"hydra.searchpath=[file://{external_conf}]", "debug=default", "stage=base"]
    r = _run([*TRAIN, *args, "logger=none", f"paths.log_dir={log_dir}"], cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (log_dir / "runs").iterdir()
    assert OmegaConf.load(run_dir / "resolved_config.yaml").ppo.kl_coef == 0.07


EXTERNAL = {
    # case: (arguments, the one line; run from the directory holding conf/, so file://conf is relative to it)
    "misspelled key": (
        ["experiment=typo", "hydra.searchpath=[file://conf]"],
        "error: ppo.kl_cof: no such key (did you mean kl_coef?) (in {conf}/experiment/typo.yaml)",
    ),
    "unknown option": (
        ["experiment=nope", "hydra.searchpath=[file://conf]"],
        "error: experiment=nope is not an option; experiment is one of: ablations, algorithms, example, mine, "
        "paper_gemma2b, paper_llama2_7b, paper_mistral7b, replicate, smol_ifeval, typo",
    ),
    "misspelled search dir": (
        ["experiment=mine", "hydra.searchpath=[file://conff]"],
        "error: experiment=mine is not an option; experiment is one of: ablations, algorithms, example, "
        "paper_gemma2b, paper_llama2_7b, paper_mistral7b, replicate, smol_ifeval "
        "(hydra.searchpath: no directory file://conff)",
    ),
}


@pytest.mark.parametrize("case", sorted(EXTERNAL))
def test_mistakes_with_an_external_experiment_are_one_line(case, external_conf, tmp_path):
    args, expected = EXTERNAL[case]
    line, elapsed = _refusal([*TRAIN, *args, "debug=default", f"paths.log_dir={tmp_path}"], cwd=external_conf.parent)
    assert line == expected.format(conf=external_conf) and elapsed < 30
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------------------------
# A Trainer asking for GPUs that are not there: one line before any stage
# ---------------------------------------------------------------------------------------------------------------
NO_GPU_SEEN = "no GPU is visible (torch.cuda.device_count() is 0): on CPU run with"
GPU_ON_CPU = f"error: trainer.accelerator: gpu, and {NO_GPU_SEEN} trainer.accelerator=cpu trainer.precision=32-true"
NO_GPU = {
    # override: the one line, as a CPU-only machine answers it (the ids are not `gpu`, the marker of GPU-only tests)
    "trainer=gpu": GPU_ON_CPU,
    "trainer=fsdp2": GPU_ON_CPU,
    "trainer=deepspeed": f"error: trainer.strategy: deepspeed_stage_2 runs on CUDA GPUs only, and {NO_GPU_SEEN} "
    "trainer=ddp trainer.accelerator=cpu",
}


@pytest.mark.parametrize("trainer", sorted(NO_GPU))
def test_gpu_trainers_without_a_gpu_are_one_line_before_any_stage(trainer, tmp_path):
    """Lightning would refuse these once the base stage had started, after seconds and in many lines. GPUs are
    hidden from the run (CUDA_VISIBLE_DEVICES=""), so a GPU machine answers as a CPU-only one does."""
    cmd = [*TRAIN, "debug=default", f"paths.log_dir={tmp_path}", trainer]
    line, elapsed = _refusal(cmd, env={"CUDA_VISIBLE_DEVICES": ""})
    assert line == NO_GPU[trainer]
    assert elapsed < 10  # start-up and the import of torch; Lightning's own refusal came after about 8 s
    assert not (tmp_path / "cache").exists()  # no stage started


def _accelerator_check(tmp_path: Path, gpus: int, *overrides: str, monkeypatch) -> None:
    from salsa import validate

    monkeypatch.setattr(validate, "visible_gpus", lambda: gpus)
    validate.check_accelerator(make_cfg(tmp_path, *overrides))


@pytest.mark.parametrize(
    ("gpus", "overrides"),
    [(0, ()), (0, ("trainer=cpu",)), (0, ("trainer=ddp",)), (0, ("trainer=fsdp2", "trainer.accelerator=cpu")),
     (0, ("trainer=ddp", "trainer.devices=auto")), (1, ("trainer=gpu",)), (1, ("trainer=ddp", "trainer.devices=1")),
     (2, ("trainer=fsdp2",)), (2, ("trainer=deepspeed",)), (2, ("trainer=gpu", "trainer.devices=[0,1]")),
     (1, ("trainer=gpu", "trainer.devices=-1")), (1, ("trainer=gpu", "trainer.devices=auto"))],
)  # fmt: skip
def test_trainers_the_machine_can_run_are_not_refused(gpus, overrides, tmp_path, monkeypatch):
    """`auto` falls back to CPU processes where there is no GPU, as Lightning does; GPUs that are there suffice."""
    _accelerator_check(tmp_path, gpus, *overrides, monkeypatch=monkeypatch)


@pytest.mark.parametrize(
    ("gpus", "overrides", "expected"),
    [(1, ("trainer=ddp",), "trainer.devices: 2 needs 2 GPUs and 1 GPU is visible: use trainer.devices=1"),
     (2, ("trainer=gpu", "trainer.devices='0,2'"), "trainer.devices: 0,2 needs 3 GPUs and 2 GPUs are visible"),
     (0, ("trainer=gpu", "trainer.accelerator=cuda"), "trainer.accelerator: cuda, and no GPU is visible"),
     (0, ("trainer=deepspeed", "trainer.accelerator=auto"), "trainer.strategy: deepspeed_stage_2 runs on CUDA"),
     (4, ("trainer=deepspeed", "trainer.accelerator=cpu"), "trainer.accelerator: cpu cannot run deepspeed_stage_2")],
)  # fmt: skip
def test_gpus_that_are_not_there_are_refused(gpus, overrides, expected, tmp_path, monkeypatch):
    from salsa.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        _accelerator_check(tmp_path, gpus, *overrides, monkeypatch=monkeypatch)
    assert str(refused.value).startswith(expected)


def test_long_prompts_are_truncated_with_a_count(upstream, tmp_path):
    log_dir = _copy_cache(upstream, tmp_path)
    r = _run([*TRAIN, "debug=default", f"paths.log_dir={log_dir}", "stage=ppo", "ppo.max_prompt_length=4"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "prompts are longer than ppo.max_prompt_length=4 tokens and are truncated" in r.stdout + r.stderr


def test_traceback_on_request(upstream):
    r = _run([*TRAIN, "debug=default", f"paths.log_dir={upstream}", "ppo.kl_coef=-1"], env={"SALSA_TRACEBACK": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# Non-finite guard
# ---------------------------------------------------------------------------------------------------------------
def test_nan_reward_stops_ppo_keeps_checkpoint_and_fails_the_runs(upstream, tmp_path, monkeypatch):
    log_dir = _copy_cache(upstream, tmp_path)
    calls = {"n": 0}
    original = FullActors.scores

    def scores(self, sequences, attention_mask, response_mask):
        calls["n"] += 1
        out = original(self, sequences, attention_mask, response_mask)
        return out * float("nan") if calls["n"] >= 3 else out  # the third rollout (iteration 2) goes NaN

    monkeypatch.setattr(FullActors, "scores", scores)
    cfg = make_cfg(log_dir, "logger=mlflow", "ref=sft", "ppo.iterations=5", "ppo.ckpt_every=1")
    with pytest.raises(NonFiniteError, match="rm score at iteration 2"):
        pipeline_job(cfg)
    (ckpt,) = (log_dir / "cache" / "ppo").glob("*.partial/checkpoints/last.ckpt")
    assert torch.load(ckpt, weights_only=True, mmap=True)["epoch"] == 1  # iterations 0 and 1 are kept
    assert not list((log_dir / "cache" / "ppo").glob("*/manifest.json"))
    client = MlflowClient(cfg.logger.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.logger.experiment_name).experiment_id])
    status = {r.data.tags.get("stage", "parent"): r.info.status for r in runs}
    assert status["ppo"] == "FAILED" and status["parent"] == "FAILED"
