"""TRL's PPOTrainer (trl 1.0.0, `trl.experimental.ppo`) on the work `ppo_throughput.py` prepared: one process.

Runs in its own virtual environment (see ppo_throughput.py), so it imports nothing from this project. It reads the
saved policy and reward model, the prompt token ids and the PPO settings from the work directory, maps the settings
onto TRL's config, trains, and writes per-iteration phase times as JSON. Phases are timed by wrapping TRL's module
functions (`batch_generation`, `forward`, `get_reward`), so TRL's own code runs unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks._common` needs only torch

import torch  # noqa: E402
import trl  # noqa: E402
import trl.experimental.ppo.ppo_trainer as ppo_trainer  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

from benchmarks._common import PhaseClock  # noqa: E402


def instrument(clock: PhaseClock) -> None:
    generation, forward, get_reward = ppo_trainer.batch_generation, ppo_trainer.forward, ppo_trainer.get_reward

    def batch_generation(model, queries, *args, **kwargs):
        out = clock.timed("generation", generation)(model, queries, *args, **kwargs)
        clock.shape = {"batch": queries.size(0), "prompt_len": queries.size(1), "response_len": out[1].size(1)}
        return out

    def timed_forward(model, *args, **kwargs):
        if isinstance(model, ppo_trainer.PolicyAndValueWrapper):  # the update's policy + value pass
            clock.mark_update()
            return forward(model, *args, **kwargs)
        return clock.timed("scoring", forward)(model, *args, **kwargs)  # the reference pass

    ppo_trainer.batch_generation = batch_generation
    ppo_trainer.forward = timed_forward
    ppo_trainer.get_reward = clock.timed("scoring", get_reward)  # value and reward passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = json.loads((args.workdir / "settings.json").read_text())
    prompt_ids = json.loads((args.workdir / "prompt_ids.json").read_text())

    tok = AutoTokenizer.from_pretrained(args.workdir / "policy")
    tok.padding_side = "left"  # TRL's generation and scoring expect left-padded queries
    policy = AutoModelForCausalLM.from_pretrained(args.workdir / "policy", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.workdir / "policy", dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(args.workdir / "reward", num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(args.workdir / "reward", num_labels=1)

    config = PPOConfig(
        output_dir=str(args.workdir / "trl-output"),  # inside the benchmark's temp dir, removed with it
        # one rollout of `batch_size` prompts; one optimizer step per minibatch, no gradient accumulation
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=s["num_minibatches"],
        local_rollout_forward_batch_size=s["batch_size"],  # generate and score the rollout in one chunk, as we do
        num_ppo_epochs=s["ppo_epochs"],
        total_episodes=s["batch_size"] * args.iterations,
        learning_rate=s["lr"],
        weight_decay=s["weight_decay"],
        adam_epsilon=1e-5,  # our AdamW's eps
        lr_scheduler_type="constant",
        response_length=s["response_length"],
        temperature=s["temperature"],
        stop_token="eos",
        missing_eos_penalty=s["missing_eos_penalty"],
        kl_coef=s["kl_coef"],
        kl_estimator=s["kl_estimator"],
        whiten_rewards=s["whiten_rewards"],
        cliprange=s["clip"],
        cliprange_value=s["value_clip"],
        vf_coef=s["vf_coef"],
        gamma=s["gamma"],
        lam=s["lam"],
        seed=s["seed"],
        # PPOConfig's own defaults differ from plain fp32 training: turn them off to match our settings
        bf16=False,
        gradient_checkpointing=False,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )

    clock = PhaseClock()
    instrument(clock)

    class Iterations(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.end_iteration()

    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=Dataset.from_dict({"input_ids": prompt_ids}),
        callbacks=[Iterations()],
    )
    trainer.train()
    out = {
        "tool": f"trl {trl.__version__}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "iterations": clock.iterations,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
