"""TRL's GRPOTrainer or RLOOTrainer (trl 1.16.0) on the work `group_throughput.py` prepared: one process.

Runs with the python of its own virtual environment (`benchmarks/.venvs/trl-group`), so it imports nothing from the
project's package; from `benchmarks` it takes only GroupClock, which needs torch alone. It reads the saved policy
(`policy/`, a Gemma causal LM with the tokenizer), the reward model (`reward/`, a one-label sequence classifier), the
prompts and our settings for `--algo` (`settings.json`), maps the settings onto TRL's config so both sides do the same
work, trains for `--iterations` of our iterations, and writes per-iteration phase times as JSON.

How an iteration of ours maps onto TRL 1.16
-------------------------------------------
Ours: sample `group_size` answers for each of `batch_size` prompts (N = batch_size × group_size answers), score
them, then `epochs` passes over the N answers, each in `num_minibatches` minibatches of N / num_minibatches answers,
one optimizer step per minibatch. In TRL's terms (its batch sizes count answers, not prompts):

  per_device_train_batch_size = N / num_minibatches    answers per micro-step: one of our minibatches
  gradient_accumulation_steps = 1                      one optimizer step per micro-step, as ours
  steps_per_generation        = num_minibatches        generation_batch_size = N: one rollout feeds num_minibatches
                                                       steps (TRL shuffles it once and splits it)
  num_iterations              = epochs                 TRL's μ: passes over each generation batch
  num_generations             = group_size             the generation batch holds N / k = batch_size prompts
  max_steps                   = iterations × num_minibatches × epochs

so TRL generates every steps_per_generation × num_iterations = num_minibatches × epochs optimizer steps, exactly
once per iteration of ours, and this script ends an iteration after that many steps. The dataset holds exactly our
batch_size prompts (as conversations: TRL renders them with the tokenizer's chat template, giving the same token
ids as ours, which the output records as `prompts_match`), so every rollout covers all of them, as ours does.

The rest: max_completion_length = response_length, temperature (top_p = 1, top_k = 0: the plain distribution, as
ours), beta = kl_coef, epsilon = clip (symmetric), learning_rate = lr with a constant schedule and no warm-up, AdamW
with our weight_decay and eps 1e-5, max_grad_norm, seed; float32 on the CPU (use_cpu, bf16 off, no vLLM, no
gradient checkpointing, dropout off), no evaluation, no checkpoints, no reporting to services (report_to=[]), logs
once per iteration (ours logs once per iteration too). GRPO: loss_aggregation "token" (mean over all answer tokens
of the minibatch) is TRL's loss_type "bnpo" with no gradient accumulation, "sequence" is "grpo"; scale_rewards
true/false is "group"/"none". RLOO: normalize_advantages as ours.

Defaults of TRL's that differ from ours, and what this script does with them:
  - loss_type (GRPO): TRL's default "dapo" normalises by the generation batch's token count; mapped as above.
    Same FLOPs either way.
  - mask_truncated_completions: False in TRL and never done by ours: left off.
  - gradient_checkpointing (True) and bf16 (True by default): turned off, ours does neither.
  - learning_rate (1e-6), beta (GRPO 0.0, RLOO 0.05), num_generations (8), max_completion_length (512),
    logging_steps (10): all set from our settings.
  - optim: the Trainer's default with torch ≥ 2.8 is fused AdamW ("adamw_torch_fused"); ours is torch's AdamW
    without `fused`. Left at TRL's default: the same update, computed the way a TRL user gets it.
  - missing_eos_penalty: TRL's GRPO/RLOO have none (ours defaults to none too); max_prompt_length: TRL 1.16 never
    truncates prompts; the benchmark's prompts are all shorter than ours' limit, so both see the whole prompt.
  - RLOO's ratio: TRL clips one importance ratio per answer (summed log-probabilities); ours clips per token. KL:
    TRL's GRPO puts k3 in the loss as ours; TRL's RLOO subtracts β · Σ_t (log π_old − log π_ref) from the reward, as
    ours does. The same passes, so the same work.

Work TRL does that ours does not (it shows in TRL's time, as it should: this is what a TRL user pays):
  - An extra forward pass of the policy, without gradients, for the "old" log-probabilities: RLOO always; GRPO
    whenever gradient_accumulation_steps is not a multiple of steps_per_generation × num_iterations, i.e. here
    whenever a rollout feeds more than one optimizer step (epochs × num_minibatches > 1). Ours records the sampling
    distribution's log-probabilities during generation instead.
  - The reward model reads text: TRL decodes the answers, renders prompt + answer with the chat template and
    tokenises again; ours scores the sampled token ids.

The reference: TRL takes no reference model argument. With beta > 0 it loads a second copy of the policy's starting
checkpoint (from the policy's own path) as the reference, so a reference other than the policy's start (πother, or a
soup of SFT models) is out of its reach; the benchmark's reference is the policy's start, which both can do.

Phases are timed by wrapping the trainer's own methods on the instance, so TRL's code runs unchanged:
`_generate_single_turn` (generation), `_get_per_token_logps_and_entropies` without gradients (logprobs: the old
policy and the reference) and with gradients (marks the start of the update), `_calculate_rewards` (reward: the
reward model's pass, with the re-tokenisation it needs), and `_generate_and_score_completions` for the shape of the
rollout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` needs only torch at import

import torch  # noqa: E402

from benchmarks.group_throughput import GroupClock, grad_off  # noqa: E402


def trl_settings(algo: str, s: dict, iterations: int, output_dir: Path) -> dict:
    """The keyword arguments of TRL's GRPOConfig / RLOOConfig that make its work equal ours (see the docstring)."""
    answers = s["batch_size"] * s["group_size"]
    steps_per_iteration = s["num_minibatches"] * s["epochs"]
    kwargs = {
        "output_dir": str(output_dir),  # inside the benchmark's temporary directory, removed with it
        "per_device_train_batch_size": answers // s["num_minibatches"],
        "gradient_accumulation_steps": 1,
        "steps_per_generation": s["num_minibatches"],
        "num_iterations": s["epochs"],
        "num_generations": s["group_size"],
        "max_steps": iterations * steps_per_iteration,
        "max_completion_length": s["response_length"],
        "temperature": s["temperature"],
        "top_p": 1.0,
        "top_k": 0,
        "beta": s["kl_coef"],
        "epsilon": s["clip"],
        "learning_rate": s["lr"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": s["weight_decay"],
        "adam_epsilon": 1e-5,  # our AdamW's eps
        "max_grad_norm": s["max_grad_norm"],
        "seed": s["seed"],
        "mask_truncated_completions": False,
        "disable_dropout": True,
        "shuffle_dataset": True,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "activation_checkpointing": False,  # gradient_checkpointing's new name in transformers 5 (TRL's default: on)
        "use_vllm": False,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": [],
        "logging_steps": steps_per_iteration,
        "log_completions": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    if algo == "grpo":
        kwargs["loss_type"] = {"token": "bnpo", "sequence": "grpo"}[s["loss_aggregation"]]
        kwargs["scale_rewards"] = "group" if s["scale_rewards"] else "none"
    else:
        kwargs["normalize_advantages"] = s["normalize_advantages"]
    return kwargs


def instrument(trainer, clock: GroupClock) -> None:
    """Time TRL's phases by wrapping the trainer's methods on this instance."""
    trainer._generate_single_turn = clock.timed("generation", trainer._generate_single_turn)
    logps = trainer._get_per_token_logps_and_entropies
    scoring = clock.timed("logprobs", logps, when=grad_off)  # the old-policy and reference passes

    def per_token_logps(*args, **kwargs):
        if torch.is_grad_enabled():  # the loss's own pass: the update has begun
            clock.mark_update()
            return logps(*args, **kwargs)
        return scoring(*args, **kwargs)

    trainer._get_per_token_logps_and_entropies = per_token_logps
    trainer._calculate_rewards = clock.timed("reward", trainer._calculate_rewards)
    generate_and_score = trainer._generate_and_score_completions

    def rollout(*args, **kwargs):
        out = generate_and_score(*args, **kwargs)
        prompt, completion = out["prompt_ids"], out["completion_ids"]
        clock.shape = {"batch": prompt.size(0), "prompt_len": prompt.size(1), "response_len": completion.size(1)}
        return out

    trainer._generate_and_score_completions = rollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iterations", type=int, required=True, help="our iterations (rollout + update) to run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--algo", choices=("grpo", "rloo"), required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    s = json.loads((args.workdir / "settings.json").read_text())[args.algo]
    prompts = json.loads((args.workdir / "prompts.json").read_text())[: s["batch_size"]]
    ours_ids = json.loads((args.workdir / "prompt_ids.json").read_text())[: s["batch_size"]]

    tok = AutoTokenizer.from_pretrained(args.workdir / "policy")
    reward_tok = AutoTokenizer.from_pretrained(args.workdir / "reward")
    policy = AutoModelForCausalLM.from_pretrained(args.workdir / "policy", dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(
        args.workdir / "reward", num_labels=1, dtype=torch.float32
    )
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    rendered = tok.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompts_match = [list(ids) for ids in rendered["input_ids"]] == ours_ids

    settings = trl_settings(args.algo, s, args.iterations, args.workdir / f"trl-{args.algo}-output")
    if args.algo == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    config = Config(**settings)

    clock = GroupClock()
    steps_per_iteration = s["num_minibatches"] * s["epochs"]

    class Iterations(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, args, state, control, **k):
            if state.global_step % steps_per_iteration == 0:  # the last optimizer step on this rollout
                clock.end_iteration()

    trainer = Trainer(
        model=policy,
        reward_funcs=reward,
        reward_processing_classes=reward_tok,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": conversations}),
        processing_class=tok,
        callbacks=[Iterations()],
    )
    instrument(trainer, clock)
    trainer.train()
    out = {
        "tool": f"trl {trl.__version__}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "iterations": clock.iterations,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "prompts_match": prompts_match,
        "trl_config": {k: v for k, v in settings.items() if k != "output_dir"},
        "reference_loaded": trainer.ref_model is not None,
    }
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
