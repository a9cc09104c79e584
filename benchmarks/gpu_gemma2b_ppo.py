"""Two PPO iterations of a Gemma-2B-sized model under the QLoRA plan: peak GPU memory and tokens per second.

    python benchmarks/gpu_gemma2b_ppo.py            # one GPU: google/gemma-2b's shape, nf4, random weights
    python benchmarks/gpu_gemma2b_ppo.py --tiny     # CPU smoke run at toy sizes (what the tests run)
    python benchmarks/gpu_gemma2b_ppo.py --quant none               # bf16 base, the soup merged into it
    python benchmarks/gpu_gemma2b_ppo.py --quant none --no-merge-start   # bf16 base, the soup as an adapter
    python benchmarks/gpu_gemma2b_ppo.py --small --quant none       # CPU: a 4-layer, width-512 model of that shape

Needs no network: the model is built from the preset's shipped config (conf/model/gemma2b.yaml, `from_config`,
random weights), saved once to a temp dir, and loaded back 4-bit by the same code the pipeline uses. Three random
LoRA "SFT ingredients" are souped into the reference; a random LoRA reward adapter with a scalar head is the reward
model and the value function's start (`salsa.models.adapter_actors.build_adapter_actors`). The PPO module is the
pipeline's own. Generation (sampling the rollout) is timed on its own as well as the whole iteration.
Goal on one GPU: peak memory <= 12 GB, so a 16 GB card fits.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from benchmarks._common import bare_trainer, sync  # noqa: E402
from salsa.algorithms.ppo import PPOConfig, PPOModule  # noqa: E402
from salsa.data.synthetic import SyntheticTask  # noqa: E402
from salsa.infra.cache import Entry  # noqa: E402
from salsa.merge.soup import ADAPTER_CONFIG, ADAPTER_WEIGHTS, soup_lora_adapters  # noqa: E402
from salsa.models.adapter_actors import build_adapter_actors  # noqa: E402
from salsa.models.hf import train_word_tokenizer  # noqa: E402
from salsa.models.qlora import BaseSettings, LoraSettings  # noqa: E402
from salsa.models.shared_base import SharedBase  # noqa: E402
from salsa.runner import quiet_libraries  # noqa: E402

SMALL_ARCH = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 1, "head_dim": 64}  # fmt: skip
TINY_ARCH = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 32}  # fmt: skip


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes on CPU (a smoke test of the script)")
    p.add_argument("--batch", type=int, default=8, help="prompts per rollout (ppo.batch_size)")
    p.add_argument("--minibatches", type=int, default=2, help="ppo.num_minibatches")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--response-len", type=int, default=128, help="new tokens per response")
    p.add_argument("--iterations", type=int, default=2, help="PPO iterations")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    p.add_argument("--goal-gb", type=float, default=12.0, help="peak-memory goal in GB (GPU only)")
    p.add_argument("--quant", choices=["nf4", "none"], default="nf4", help="model.quant of the base")
    p.add_argument(
        "--merge-start", action=argparse.BooleanOptionalAction, default=True,
        help="ppo.merge_start: with --quant none, fold the soup into the base (policy = base + one adapter)",
    )  # fmt: skip
    p.add_argument(
        "--small", action="store_true",
        help="a 4-layer, width-512 model of Gemma's shape with the word tokenizer's vocabulary (CPU runs)",
    )  # fmt: skip
    return p.parse_args(argv)


def random_checkpoint(out: Path, arch: dict, tokenizer, device: torch.device) -> int:
    """A model of `arch`'s shape with random weights, saved like a hub checkpoint (bf16 safetensors + tokenizer);
    returns its number of parameters."""
    fields = dict(arch)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device):  # initialising 2.5B weights is fast on a GPU, slow on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def random_adapters(settings: BaseSettings, device: torch.device, out: Path, hidden: int) -> dict[str, Path]:
    """Three random LoRA "SFT ingredients" and a random reward adapter with a scalar head, saved like the stages'."""
    shared = SharedBase.load(BaseSettings(**{**settings.__dict__, "gradient_checkpointing": False}), device)
    paths = {}
    for name in ("sft0", "sft1", "sft2", "rm"):
        shared._add(name, settings.lora.config(init_lora_weights=False), trainable=False)  # B != 0: "trained"
        shared.save_adapter(name, out / name)
        paths[name] = out / name
    tensors = load_file(str(paths["rm"] / ADAPTER_WEIGHTS))
    tensors["base_model.model.score.weight"] = torch.randn(1, hidden) / hidden**0.5
    save_file(tensors, str(paths["rm"] / ADAPTER_WEIGHTS))
    cfg = json.loads((paths["rm"] / ADAPTER_CONFIG).read_text())
    cfg.update(task_type="SEQ_CLS", modules_to_save=["score"])
    (paths["rm"] / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    soup_lora_adapters([paths[f"sft{i}"] for i in range(3)], out / "soup")
    paths["soup"] = out / "soup"
    del shared
    return paths


class TimedPPO(PPOModule):
    """The pipeline's PPO module, recording each iteration's wall time, its generation's, and response tokens."""

    def generate(self, query, query_mask):
        sync()
        started = time.perf_counter()
        samples = super().generate(query, query_mask)
        sync()
        self.generation = [*getattr(self, "generation", []), time.perf_counter() - started]
        return samples

    def on_train_epoch_start(self) -> None:
        sync()
        self._started = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        sync()
        self.timings = [*getattr(self, "timings", []), time.perf_counter() - self._started]
        tokens = self.last_stats["ppo/response_length"] * self.config.batch_size
        self.tokens = [*getattr(self, "tokens", []), tokens]


def main(argv=None) -> dict:
    args = parse(argv)
    quiet_libraries()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    # the preset is a global package: its model settings sit under `model:` (beside its scale's settings)
    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "gemma2b.yaml"), resolve=True)["model"]
    arch = dict(preset["arch"])
    task = SyntheticTask(0)
    tokenizer = train_word_tokenizer(task.pretrain_documents(200))
    words = [w for w in tokenizer.get_vocab() if not w.startswith("<")]
    if args.tiny:
        arch.update(TINY_ARCH, vocab_size=len(tokenizer))
        args.batch, args.prompt_len, args.response_len, args.rank = 4, 8, 6, 4
    elif args.small:  # the decoder's cost, where the adapters are, not a 256k-row LM head's
        arch.update(SMALL_ARCH, vocab_size=len(tokenizer))
    # prompts of exactly prompt_len words; the word-level tokenizer makes each word one token
    gen = torch.Generator().manual_seed(0)
    prompts = [
        " ".join(words[i] for i in torch.randint(len(words), (args.prompt_len,), generator=gen).tolist())
        for _ in range(4 * args.batch)
    ]
    lora = LoraSettings(r=args.rank, alpha=2 * args.rank, dropout=0.0, target_modules=preset["lora"]["target_modules"])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        n_params = random_checkpoint(tmp / "base", arch, tokenizer, device)
        settings = BaseSettings(
            name_or_path=str(tmp / "base"), quant=args.quant, gradient_checkpointing=True, lora=lora
        )
        paths = random_adapters(settings, device, tmp, arch["hidden_size"])
        setup_s = time.perf_counter() - t0
        gc.collect()  # the checkpoint-making copies must be gone before the measured run starts
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        def entry(stage: str, name: str) -> Entry:
            return Entry(stage, name, paths[name], {}, reused=False)

        soup = entry("soup", "soup")
        actors = build_adapter_actors(settings, soup, soup, entry("rm", "rm"), device, merge_start=args.merge_start)
        config = PPOConfig(
            iterations=args.iterations,
            batch_size=args.batch,
            num_minibatches=args.minibatches,
            ppo_epochs=1,
            response_length=args.response_len,
            max_prompt_length=args.prompt_len + 8,  # room for the template's tokens around the words
            lr=1e-5,
        )
        module = TimedPPO(actors, tokenizer, prompts, config)
        trainer = bare_trainer(
            args.iterations,
            accelerator="gpu" if cuda else "cpu",
            precision="bf16-mixed" if cuda else "32-true",
        )
        trainer.fit(module)

    steady = module.timings[1:] or module.timings  # the first iteration includes CUDA warm-up
    steady_gen = module.generation[1:] or module.generation
    tokens = sum(module.tokens[1:] or module.tokens)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": "google/gemma-2b shape" if not args.tiny else "tiny",
        "parameters_b": round(n_params / 1e9, 3),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "iterations": args.iterations,
        "quant": args.quant,
        "merged_start": args.quant == "none" and args.merge_start,
        "policy_adapters": len(actors.policy.names),
        "setup_s": round(setup_s, 1),
        "iteration_s": [round(t, 2) for t in module.timings],
        "generation_s": [round(t, 2) for t in module.generation],
        "tokens_per_s": round(tokens / sum(steady), 1),
        "generation_tokens_per_s": round(tokens / sum(steady_gen), 1),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2) if cuda else None,
        "final_stats": {k: round(v, 4) for k, v in module.last_stats.items()},
    }
    if cuda:
        result["goal_met"] = result["peak_reserved_gb"] <= args.goal_gb
    print(json.dumps(result, indent=2))
    print(
        f"\npeak GPU memory {result['peak_allocated_gb']} GB allocated / {result['peak_reserved_gb']} GB reserved "
        f"(goal <= {args.goal_gb} GB); {result['tokens_per_s']} response tokens/s over PPO iterations "
        f"(rollout + scoring + update), {result['generation_tokens_per_s']} in generation alone"
        if cuda
        else f"\n{result['tokens_per_s']} response tokens/s on CPU (smoke run)"
    )
    return result


if __name__ == "__main__":
    main()
