"""trainer=fsdp2 (FSDP2 through Lightning's ModelParallelStrategy) on two CPU processes (gloo): the pipeline trains
to what DDP trains, a PPO run resumes from a checkpoint of the trainable weights alone, and sampling on sharded
weights needs no collective per generated token."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]  # as tests.conftest's, without its imports in the spawned ranks below

COMMON = [
    "debug=default", "trainer.accelerator=cpu", "trainer.devices=2", "ref=sft", "stage=ppo", "logger=none",
    "extras.keep_rank_outputs=true", "extras.torch_threads=1", "data.task.n_pretrain=64", "ppo.iterations=2",
    "ppo.max_grad_norm=0.01",  # every update clipped: LightningModule.clip_gradients on sharded gradients
]  # fmt: skip
TRAINERS = {"ddp": ["trainer=ddp"], "fsdp2": ["trainer=fsdp2", "trainer.precision=32-true"]}
STAGES = ("base", "sft", "rm", "ppo")

# src/train.py with PPO's second iteration failing, in every rank (Lightning starts rank 1 with this same command)
INTERRUPTED = """
import runpy, sys
from salsa.algorithms.ppo import PPOModule
step = PPOModule.training_step
def failing(self, batch, batch_idx):
    if self.current_epoch == 1:
        raise RuntimeError("interrupted")
    return step(self, batch, batch_idx)
PPOModule.training_step = failing
runpy.run_path({train!r}, run_name="__main__")
"""


def _train(log_dir: Path, *overrides: str, script: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, script or str(ROOT / "src" / "train.py"), *COMMON, f"paths.log_dir={log_dir}", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _published(log_dir: Path, stage: str) -> Path:
    (path,) = [p for p in (log_dir / "cache" / stage).iterdir() if p.is_dir() and "." not in p.name]
    return path


def _metrics(path: Path) -> dict[str, float]:
    return json.loads((path / "manifest.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same run (base, SFT, RM, PPO) under trainer=ddp and under trainer=fsdp2, each from an empty cache."""
    out = {}
    for name, overrides in TRAINERS.items():
        out[name] = tmp_path_factory.mktemp(name)
        done = _train(out[name], *overrides)
        assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_fsdp2_trains_what_ddp_trains(runs):
    """Every rank sees the same rows under both (PlanSampler slices, `iteration_prompts`), and FSDP2's
    reduce-scatter averages gradients as DDP's all-reduce does: the published stages agree to float rounding."""
    ddp, fsdp2 = runs["ddp"], runs["fsdp2"]
    for stage in STAGES:
        ours, theirs = _published(fsdp2, stage), _published(ddp, stage)
        assert ours.name == theirs.name  # the same cache key: the strategy is not part of what a stage is
        assert _metrics(ours) == pytest.approx(_metrics(theirs), rel=1e-4, abs=1e-6), stage
        assert all(math.isfinite(v) for v in _metrics(ours).values())
        replica = ours.parent / f"{ours.name}.rank0-1"  # rank 1 trained alongside and recorded the same
        assert _metrics(replica) == pytest.approx(_metrics(ours), rel=1e-6), stage
    # the reward model's head was scaled to unit s.d. (rm.normalize) in both: the sharded head's own weights, not
    # the gathered copy FSDP2 drops at its next reshard
    heads = [load_file(_published(run, "rm") / "model.safetensors")["score.weight"] for run in (fsdp2, ddp)]
    torch.testing.assert_close(heads[0], heads[1], rtol=1e-4, atol=1e-6)
    for stage in STAGES:  # the gathered weights, written by rank 0, as DDP's rank 0 wrote them
        ours, theirs = (load_file(_published(d, stage) / "model.safetensors") for d in (fsdp2, ddp))
        assert sorted(ours) == sorted(theirs), stage  # tied weights once (Gemma's LM head is its embedding)
        for name, tensor in theirs.items():
            torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=f"{stage} {name}")
    trained = load_file(_published(fsdp2, "ppo") / "model.safetensors")
    start = load_file(_published(fsdp2, "sft") / "model.safetensors")
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-5  # PPO moved the policy


def test_fsdp2_ppo_resumes_from_trainable_weights(runs, tmp_path):
    """A PPO run that fails in its second iteration leaves the first iteration's checkpoint, gathered whole on rank 0
    and holding the trainable models only; the rerun restores it into the sharded models and ends where the
    uninterrupted run ended."""
    log_dir = tmp_path / "logs"
    shutil.copytree(runs["fsdp2"] / "cache", log_dir / "cache", ignore=shutil.ignore_patterns("*.lock", "ppo"))
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED.format(train=str(ROOT / "src" / "train.py")))
    failed = _train(log_dir, *TRAINERS["fsdp2"], "ppo.ckpt_every=1", script=str(script))
    assert failed.returncode != 0 and "interrupted" in failed.stderr

    (ckpt,) = (log_dir / "cache" / "ppo").glob("*.partial/checkpoints/last.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0 and saved["global_step"] == 2  # one iteration: two minibatches
    state = saved["state_dict"]
    assert {k.split(".")[1] for k in state} == {"policy", "value"}  # no frozen reference or reward model
    sft = load_file(_published(runs["fsdp2"], "sft") / "model.safetensors")
    for name, tensor in sft.items():  # whole tensors, not shards
        assert type(state[f"actors.policy.{name}"]) is torch.Tensor
        assert state[f"actors.policy.{name}"].shape == tensor.shape
    assert len(saved["optimizer_states"][0]["state"]) == len(state)

    resumed = _train(log_dir, *TRAINERS["fsdp2"], "ppo.ckpt_every=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    ours, theirs = _published(log_dir, "ppo"), _published(runs["fsdp2"], "ppo")
    assert _metrics(ours) == pytest.approx(_metrics(theirs), rel=1e-6, abs=1e-9)
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    for name, tensor in b.items():
        torch.testing.assert_close(a[name], tensor, rtol=0, atol=1e-7)


def _sample_on_shards(rank: int, world: int, port: int, out: str) -> None:
    """One rank of `test_sampling_clipping_and_saving_on_sharded_weights`."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from transformers import GemmaConfig, GemmaForCausalLM

    from salsa.models.generation import sample
    from salsa.models.sharding import is_sharded, save_pretrained, shard_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    config = GemmaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    plain, model = GemmaForCausalLM(config), GemmaForCausalLM(config)
    model.load_state_dict(plain.state_dict())
    shard_model(model, init_device_mesh("cpu", (world,)))
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 39, "bos_token_id": 1})()  # 39: never the pad
    queries = [torch.randint(3, 39, (2, 5), generator=torch.Generator().manual_seed(r)) for r in range(world)]
    query = queries[rank]
    mask = torch.ones_like(query)
    new_tokens = 3 + 4 * rank  # ranks run different numbers of forward passes, as when their answers end apart
    got = []
    for m in (model, plain):
        torch.manual_seed(rank)
        got.append(sample(m, tok, query, mask, new_tokens))
    assert torch.equal(got[0].response, got[1].response)
    torch.testing.assert_close(got[0].logprobs, got[1].logprobs, rtol=1e-5, atol=1e-6)
    assert is_sharded(model) and all(isinstance(p, DTensor) for p in model.parameters())  # resharded after
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)  # the ranks' collectives still pair up
    assert total.item() == world * (world + 1) / 2
    # sampling left no inference-mode buffer behind: the model trains, its gradients averaged over the ranks and
    # clipped by their global norm (Lightning's clip_gradients calls clip_grad_norm_), as one process would
    model.train()
    model(input_ids=query).logits.square().mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    plain.train()
    (sum(plain(input_ids=q).logits.square().mean() for q in queries) / world).backward()
    norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e-3)
    assert norm > 1e-2  # the clip bites
    for (name, sharded), whole in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(sharded.grad.full_tensor(), whole.grad, rtol=1e-5, atol=1e-9, msg=name)
    save_pretrained(model, out)
    if rank == 0:  # the weights it was given, each tensor once
        saved = load_file(Path(out) / "model.safetensors")
        expected = {k: v for k, v in plain.state_dict().items() if k != "lm_head.weight"}
        assert sorted(saved) == sorted(expected)
        assert all(torch.equal(saved[k], v) for k, v in expected.items())
    dist.destroy_process_group()


def test_sampling_clipping_and_saving_on_sharded_weights(tmp_path):
    """Sampling gathers the sharded model once (no collective per token, so ranks may stop at different lengths),
    samples what the unsharded model samples and reshards; the model then trains, gradients clipped by their global
    norm over the shards; rank 0 alone saves it, whole, each tied weight once."""
    import socket

    import torch.multiprocessing as mp
    from transformers import GemmaForCausalLM

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sample_on_shards, args=(2, port, str(tmp_path / "saved")), nprocs=2, join=True)
    model = GemmaForCausalLM.from_pretrained(tmp_path / "saved")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
