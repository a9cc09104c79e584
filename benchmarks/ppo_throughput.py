"""PPO throughput: our PPOModule + FullActors against TRL's PPOTrainer on the same work, measured in one run.

For each model size the benchmark makes random weights (a causal LM for policy and reference, a scalar-head model for
value and reward), saves them with save_pretrained, picks the prompts, and writes the PPO settings. Then it runs our
PPO and TRL's PPO back to back, each in its own process, alternating which goes first, `--rounds` times. TRL runs in
its own virtual environment (`benchmarks/.venvs/trl`, made on first use with trl==1.0.0), so the project's own
dependencies stay current.

Per phase (generation; reference, value and reward scoring; the PPO update; everything else) it reports seconds,
response tokens per second and achieved FLOP/s against this machine's measured fp32 matmul rate, and the ours/TRL
ratio by wall-clock and by CPU time (a process's own, which waiting for a busy machine's cores does not inflate);
per run, the peak resident set size. "Tokens" are the batch's response tokens (batch × response length): the
unit both trainers turn into training signal. FLOPs are model FLOPs (2 per multiply-accumulate in every linear
layer, plus attention scores and values; backward = 2 × forward) of the work that must be done, so a trainer that
computes more than that shows a lower rate.

    python benchmarks/ppo_throughput.py                     # tiny and mid, ours and TRL
    python benchmarks/ppo_throughput.py --sizes tiny --no-trl
    python benchmarks/ppo_throughput.py --smoke             # seconds; TRL too only if its venv already exists
    python benchmarks/ppo_throughput.py --sizes tiny --compile --iterations 100 --rounds 1   # + ppo.compile, long

`--compile` adds a third side, ours with `ppo.compile` (the four decoders under torch.compile). Its first iteration
includes compiling; its on-disk cache lives in the benchmark's work directory, so the first compiled run of an
invocation compiles from scratch and later rounds load the cache (as the jobs of a sweep do). Besides the per-phase
medians (first `--warmup` iterations dropped), the report gives each run's first iteration and its total over all
iterations, compile included.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks._common import VENVS, PhaseClock, bare_trainer, ensure_venv, human_bytes, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRL_PACKAGES = ["trl==1.0.0"]  # its PPOTrainer's last release (`trl.experimental.ppo`)
PHASES = ("generation", "scoring", "update", "other", "iteration")

# ~52M parameters per model: 6 Gemma layers of width 768 (GQA 12:4 heads), with the project's tokenizer
MID_ARCH = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 128,
}


def sizes() -> dict[str, dict]:
    """Model architecture and PPO settings per size. `tiny` is the project's default model and PPO config."""
    tiny_arch = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml").arch)
    debug = OmegaConf.load(ROOT / "conf/debug/default.yaml")
    return {
        "tiny": {"arch": tiny_arch, "ppo": {}},
        "mid": {"arch": MID_ARCH, "ppo": {"batch_size": 16}},
        "smoke": {
            "arch": {**tiny_arch, **OmegaConf.to_container(debug.model.arch)},
            "ppo": {"batch_size": 4, "response_length": 6, "ppo_epochs": 1},
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# FLOPs (pure)
# ---------------------------------------------------------------------------------------------------------------
def lm_forward_flops(arch: dict, vocab: int, tokens: float, context: float, lm_head_tokens: float = 0) -> float:
    """Model FLOPs of a decoder forward over `tokens` positions that attend to `context` positions on average, with
    the LM head applied at `lm_head_tokens` of them: 2 per multiply-accumulate (Kaplan et al. 2020's count).

    Per position and layer: Q, K, V, O projections, a gated MLP (gate, up, down), and QKᵀ plus AV (each
    heads · head_dim · context multiply-accumulates). Embedding lookups and norms are not counted.
    """
    d, f, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    q = arch["num_attention_heads"] * arch["head_dim"]
    kv = arch["num_key_value_heads"] * arch["head_dim"]
    per_position = layers * (d * q + 2 * d * kv + q * d + 3 * d * f + 2 * q * context)
    return 2.0 * (tokens * per_position + lm_head_tokens * d * vocab)


def phase_flops(arch: dict, vocab: int, batch: int, prompt_len: int, response_len: int, ppo_epochs: int) -> dict:
    """The work of one PPO iteration per phase, for left-padded prompts of width P and responses of width R.

    generation: the policy over the P + R - 1 positions that predict a response token (as a KV-cached decode does),
    the LM head at the R that do; scoring: the reference with its LM head at R positions, value and reward
    backbones over all P + R; update: `ppo_epochs` × (forward + 2 × forward backward) of policy and value.
    """
    t = prompt_len + response_len
    policy = lm_forward_flops(arch, vocab, batch * t, (t + 1) / 2, batch * response_len)
    backbone = lm_forward_flops(arch, vocab, batch * t, (t + 1) / 2)
    generation = lm_forward_flops(arch, vocab, batch * (t - 1), t / 2, batch * response_len)
    return {"generation": generation, "scoring": policy + 2 * backbone, "update": ppo_epochs * 3 * (policy + backbone)}


def matmul_flops_per_s(n: int = 1024, seconds: float = 1.0) -> float:
    """This machine's fp32 matmul rate at the current thread count: the best of repeated n×n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


# ---------------------------------------------------------------------------------------------------------------
# The work: weights, tokenizer, prompts, settings
# ---------------------------------------------------------------------------------------------------------------
def prepare(workdir: Path, size: dict, seed: int = 0) -> dict:
    """Save policy and reward weights, the prompts (text for us, token ids for TRL) and the PPO settings."""
    from transformers import GemmaForSequenceClassification
    from transformers.utils import logging as hf_logging

    from salsa.algorithms.ppo import PPOConfig
    from salsa.data.task import synthetic_data
    from salsa.data.tokens import prompt_ids
    from salsa.models.hf import num_parameters, tiny_gemma, train_word_tokenizer
    from salsa.stages.base import task_texts

    hf_logging.disable_progress_bar()
    ppo_defaults = OmegaConf.load(ROOT / "conf/ppo/default.yaml")
    ppo_defaults.seed = seed  # the default interpolates the root config's seed
    # TRL's PPO loop never clips gradients; a zero max_grad_norm switches our clipping off, so both do the same work
    config = replace(PPOConfig.from_cfg(ppo_defaults), max_grad_norm=0.0, **size["ppo"])
    data = synthetic_data(
        seed, n_pretrain=2000, n_sft=500, n_sft_val=10, n_pairs=200, n_pairs_val=10, n_eval_prompts=10
    )
    tok = train_word_tokenizer(task_texts(data))
    torch.manual_seed(seed)
    policy = tiny_gemma(tok, **size["arch"])
    reward_config = copy.deepcopy(policy.config)
    reward_config.num_labels = 1  # a scalar head, as our reward model and TRL's value model expect
    reward = GemmaForSequenceClassification(reward_config)
    for name, model in (("policy", policy), ("reward", reward)):
        model.save_pretrained(workdir / name)
        tok.save_pretrained(workdir / name)
    # one fixed batch of prompts: our module draws a permutation of all of them each iteration, TRL's dataloader a
    # shuffle of all of them, so both roll out exactly these prompts, with the same left-padded width
    prompts = data.prompts_train[: config.batch_size]
    (workdir / "prompts.json").write_text(json.dumps(prompts))
    ids = [prompt_ids(tok, p, config.max_prompt_length) for p in prompts]
    (workdir / "prompt_ids.json").write_text(json.dumps(ids))
    (workdir / "settings.json").write_text(json.dumps(asdict(config), indent=1))
    return {"parameters": num_parameters(policy), "vocab": len(tok), "config": config}


# ---------------------------------------------------------------------------------------------------------------
# Our side: one process running PPOModule under Lightning, phases timed from outside the math
# ---------------------------------------------------------------------------------------------------------------
def run_ours(workdir: Path, iterations: int, out: Path, compiled: bool = False) -> None:

    from salsa.algorithms.ppo import PPOConfig, PPOModule
    from salsa.infra.cache import Entry
    from salsa.models.hf import load_tokenizer
    from salsa.stages.ppo import build_actors

    clock = PhaseClock()

    def scoring(fn):
        def wrapper(*args, **kwargs):  # the update's own value pass (with gradients) belongs to the update
            return clock.timed("scoring", fn)(*args, **kwargs) if not torch.is_grad_enabled() else fn(*args, **kwargs)

        return wrapper

    class TimedPPO(PPOModule):
        def generate(self, query, query_mask):
            s = clock.timed("generation", super().generate)(query, query_mask)
            clock.shape = {"batch": query.size(0), "prompt_len": query.size(1), "response_len": s[0].response.size(1)}
            return s

        def update(self, batch, prompt_len, iteration):
            clock.mark_update()
            return super().update(batch, prompt_len, iteration)

        def on_train_start(self) -> None:
            clock.start()

        def on_train_batch_end(self, *args) -> None:
            clock.end_iteration()

    config = PPOConfig(**{**json.loads((workdir / "settings.json").read_text()), "iterations": iterations})
    policy_dir, reward_dir = (Entry("bench", n, workdir / n, {}, False) for n in ("policy", "reward"))
    actors = build_actors(policy_dir, policy_dir, reward_dir)
    if compiled:
        actors.compile()
    actors.reference_logits = scoring(actors.reference_logits)
    actors.values = scoring(actors.values)
    actors.scores = scoring(actors.scores)
    prompts = json.loads((workdir / "prompts.json").read_text())
    module = TimedPPO(actors, load_tokenizer(workdir / "policy"), prompts, config, judge=None)
    trainer = bare_trainer(iterations)
    trainer.fit(module)
    result = {
        "tool": "salsa-compiled" if compiled else "salsa",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "iterations": clock.iterations,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    out.write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# Orchestration and report
# ---------------------------------------------------------------------------------------------------------------
def run_side(side: str, python: Path, workdir: Path, iterations: int, threads: int | None) -> dict:
    out = workdir / f"{side}-{time.monotonic_ns()}.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if side in ("ours", "compiled"):
        cmd = [str(python), str(Path(__file__).resolve()), "--worker", "--workdir", str(workdir), "--out", str(out)]
        if side == "compiled":
            cmd.append("--compiled")
            env["TORCHINDUCTOR_CACHE_DIR"] = str(workdir / "inductor")  # cold in the first round, warm after
    else:
        cmd = [str(python), str(Path(__file__).with_name("trl_ppo.py")), "--workdir", str(workdir), "--out", str(out)]
    cmd += ["--iterations", str(iterations)] + (["--threads", str(threads)] if threads else [])
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = run_measured(cmd, env=env)
    if done.returncode or not out.exists():
        raise RuntimeError(f"{side} run failed (exit {done.returncode}):\n{done.output[-4000:]}")
    result = json.loads(out.read_text())
    result["peak_rss_bytes"] = max(result["peak_rss_bytes"], done.peak_rss_bytes)
    return result


def summarise(runs: list[dict], warmup: int, arch: dict, vocab: int, ppo_epochs: int) -> dict:
    """Median seconds per phase over the measured iterations (each run's first `warmup` dropped), with tokens/s and
    achieved FLOP/s from each iteration's own shape."""
    its = [it for r in runs for it in r["iterations"][warmup:]]
    out = {"iterations_measured": len(its), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs)}
    for phase in PHASES:
        secs = statistics.median(it[phase] for it in its)
        cpu = statistics.median(it[f"cpu_{phase}"] for it in its)
        tokens = statistics.median(it["batch"] * it["response_len"] for it in its)
        flops = [phase_flops(arch, vocab, it["batch"], it["prompt_len"], it["response_len"], ppo_epochs) for it in its]
        work = statistics.median(sum(f.values()) if phase == "iteration" else f.get(phase, 0.0) for f in flops)
        out[phase] = {
            "seconds": secs,
            "cpu_seconds": cpu,
            "tokens_per_s": tokens / secs if secs > 0 else None,
            "flops_per_s": work / secs,
        }
    out["shape"] = {k: statistics.median(it[k] for it in its) for k in ("batch", "prompt_len", "response_len")}
    out["first_iteration_s"] = [r["iterations"][0]["iteration"] for r in runs]  # compiling included
    out["total_s"] = [sum(it["iteration"] for it in r["iterations"]) for r in runs]
    return out


def report(name: str, info: dict, summary: dict[str, dict], peak: float) -> str:
    c = info["config"]
    sides = list(summary)
    ours = [s for s in sides if s != "trl"] if "trl" in summary else []  # the sides compared with TRL
    shape = summary[sides[0]]["shape"]
    lines = [
        f"## {name}: {info['parameters'] / 1e6:.1f}M parameters per model, vocabulary {info['vocab']}; batch "
        f"{c.batch_size}, prompt width {shape['prompt_len']:.0f}, response {shape['response_len']:.0f} tokens, "
        f"{c.ppo_epochs} epochs × {c.num_minibatches} minibatches; medians of "
        + ", ".join(f"{s}: {summary[s]['iterations_measured']} iterations" for s in sides),
        "",
        "| phase | "
        + " | ".join(f"{s} s | {s} tok/s | {s} GFLOP/s (% of matmul)" for s in sides)
        + "".join(f" | {s}/TRL throughput | {s}/TRL by CPU time" for s in ours)
        + " |",
        "|---" * (1 + 3 * len(sides) + 2 * len(ours)) + "|",
    ]
    for phase in PHASES:
        row = [phase]
        for s in sides:
            p = summary[s][phase]
            row += [f"{p['seconds']:.3f}", f"{p['tokens_per_s']:.0f}" if p["tokens_per_s"] else "-"]
            row.append(
                f"{p['flops_per_s'] / 1e9:.1f} ({100 * p['flops_per_s'] / peak:.0f}%)" if phase != "other" else "-"
            )
        for side in ours:
            for key in ("seconds", "cpu_seconds"):
                row.append(f"{summary['trl'][phase][key] / summary[side][phase][key]:.2f}×")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| peak RSS | " + " | ".join(f"{human_bytes(summary[s]['peak_rss_bytes'])} | | " for s in sides) + "|")
    lines.append(
        "\nseconds are wall-clock; CPU time is each process's own (all threads), which a busy machine inflates less"
    )
    lines += ["", "| side | first iteration s, per run (compiling included) | whole run s, per run |", "|---|---|---|"]
    for s in sides:
        first = ", ".join(f"{t:.1f}" for t in summary[s]["first_iteration_s"])
        lines.append(f"| {s} | {first} | {', '.join(f'{t:.1f}' for t in summary[s]['total_s'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated: tiny, mid, smoke")
    parser.add_argument("--iterations", type=int, default=4, help="PPO iterations per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=1, help="iterations dropped from the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="ours/TRL pairs per size, alternating who goes first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--no-trl", action="store_true", help="only our side")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round; TRL only if its venv exists")
    parser.add_argument("--json", type=Path, default=None, help="also write the summaries here")
    parser.add_argument("--compile", action="store_true", help="also ours with ppo.compile (torch.compile)")
    # worker mode (internal): one of our runs in this process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return run_ours(args.workdir, args.iterations, args.out, args.compiled)
    if args.smoke:
        args.sizes, args.iterations, args.warmup, args.rounds = "smoke", 2, 1, 1

    trl_python = None
    if not args.no_trl:
        if args.smoke:
            candidate = VENVS / "trl" / "bin" / "python"
            trl_python = candidate if (VENVS / "trl" / ".installed").exists() else None
            if trl_python is None:
                print("[smoke] no TRL venv yet: our side only (a full run makes it)")
        else:
            trl_python, why = ensure_venv("trl", TRL_PACKAGES)
            if trl_python is None:
                sys.exit(f"could not make the TRL venv: {why}")

    peak = matmul_flops_per_s()
    threads = torch.get_num_threads()
    print(f"# PPO throughput — torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs")
    print(f"fp32 matmul rate (1024², best of 1 s): {peak / 1e9:.1f} GFLOP/s\n")
    results = {"torch": torch.__version__, "threads": threads, "matmul_flops_per_s": peak, "sizes": {}}
    table = sizes()
    for name in args.sizes.split(","):
        size = table[name]
        with tempfile.TemporaryDirectory(prefix=f"ppo-bench-{name}-") as tmp:
            workdir = Path(tmp)
            info = prepare(workdir, size)
            runs: dict[str, list[dict]] = {
                "ours": [], **({"compiled": []} if args.compile else {}), **({"trl": []} if trl_python else {})
            }  # fmt: skip
            for r in range(args.rounds):
                order = list(runs) if r % 2 == 0 else list(reversed(runs))
                for side in order:
                    python = trl_python if side == "trl" else Path(sys.executable)
                    runs[side].append(run_side(side, python, workdir, args.iterations, args.threads))
                    print(f"[{name}] round {r + 1}/{args.rounds}: {side} done", flush=True)
            summary = {
                s: summarise(v, args.warmup, size["arch"], info["vocab"], info["config"].ppo_epochs)
                for s, v in runs.items()
            }
        print(report(name, info, summary, peak) + "\n", flush=True)
        results["sizes"][name] = {"parameters": info["parameters"], "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
