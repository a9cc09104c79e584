"""Where a PPO update's time goes: the pipeline's PPO module on the default tiny model and settings (batch 64, response
40, 2 epochs × 2 minibatches), one update profiled with torch.profiler after warm-up iterations.

Operators are grouped by what they do (matmuls, attention, softmax and log-softmax, elementwise, the optimizer,
copies and indexing, the rest); "outside operators" is the update's wall time that no operator accounts for (Python,
autograd's graph bookkeeping, Lightning's hooks). The split says what could make the update faster at the same
work: fused or batched passes remove operator calls, a compiled update removes the Python around them, and nothing
but less arithmetic moves the matmuls.

    python benchmarks/ppo_update_profile.py                  # the default tiny model
    python benchmarks/ppo_update_profile.py --smoke          # seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import bare_trainer  # noqa: E402
from benchmarks.sampling_throughput import ROOT, machine, random_actors, tiny_model  # noqa: E402

GROUPS = {  # operator name fragments, first match wins
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear"),
    "attention": ("scaled_dot_product", "attention"),
    "softmax": ("softmax", "log_softmax", "logsumexp"),
    "optimizer": ("foreach", "adam", "clip_grad", "norm"),
    "copies and indexing": tuple(
        "copy index gather scatter cat stack to clone contiguous select slice view reshape expand transpose "
        "permute empty zeros fill embedding".split()
    ),
    "elementwise": tuple(
        "mul add sub div exp pow rsqrt tanh gelu neg clamp where maximum minimum mean sum sqrt sigmoid".split()
    ),
}


def group_of(name: str) -> str:
    op = name.removeprefix("aten::").lower()
    for group, fragments in GROUPS.items():
        if any(f in op for f in fragments):
            return group
    return "other operators"


def build(args):
    from omegaconf import OmegaConf

    from salsa.algorithms.ppo import PPOModule
    from salsa.config import PPOConfig

    arch = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml").arch)
    if args.smoke:
        arch.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=32)
    model, tok, prompts = tiny_model(arch)
    ppo = PPOConfig(**({"batch_size": 8, "response_length": 8} if args.smoke else {}), iterations=args.warmup + 1)
    return PPOModule(random_actors(model), tok, prompts, ppo)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=2, help="iterations before the profiled one")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    module = build(args)
    original = module.update
    record: dict = {}

    def update(batch, prompt_len, iteration):
        if iteration < args.warmup:
            return original(batch, prompt_len, iteration)
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = original(batch, prompt_len, iteration)
        record["wall_s"] = time.perf_counter() - started
        record["events"] = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
        return out

    module.update = update
    bare_trainer(args.warmup + 1, accelerator="cpu").fit(module)
    groups: dict[str, float] = {}
    calls = 0
    for name, seconds, count in record["events"]:
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + seconds
        calls += count
    in_ops = sum(groups.values())
    # the profiler's own cost inflates the wall time by a little per operator call; it stays in "outside operators"
    groups["outside operators"] = max(record["wall_s"] - in_ops, 0.0)
    result = {"machine": machine(), "wall_s": record["wall_s"], "operator_calls": calls, "groups_s": groups,
              "top": sorted(record["events"], key=lambda e: -e[1])[:15]}  # fmt: skip
    print(json.dumps(result["machine"]))
    print(f"update wall {record['wall_s']:.3f} s (profiled), {calls} operator calls")
    for g, s in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<22} {s:7.3f} s  {100 * s / record['wall_s']:5.1f}%")
    print("top operators (self CPU s, calls):")
    for name, s, n in result["top"]:
        print(f"  {name:<40} {s:7.3f}  {n}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
