"""GRPO and RLOO throughput: our GRPOModule / RLOOModule against TRL's GRPOTrainer / RLOOTrainer on the same work.

Both algorithms are critic-free: each iteration samples `group_size` answers for each of `batch_size` prompts, scores
them with the reward model and the reference, and takes `epochs` × `num_minibatches` optimizer steps on the
batch_size × group_size answers. For each size the benchmark saves random weights (a causal LM for the policy, whose
start is also the reference, and a scalar-head model for the reward), the prompts and each algorithm's settings in a
work directory. Then, per algorithm, it runs our side and TRL's side back to back, each in its own process,
alternating which goes first, `--rounds` times. TRL runs in its own virtual environment
(`benchmarks/.venvs/trl-group`, made on first use with trl==1.16.0; `benchmarks/trl_group.py` says how our settings
map onto TRL's config), so the project's own dependencies stay current. Everything runs on the CPU in float32.

Per phase it reports seconds, answer tokens per second, achieved FLOP/s against this machine's measured fp32 matmul
rate, and the ours/TRL ratio by wall-clock and by CPU time (a process's own, which waiting for a busy machine's cores
inflates less); per run, the peak resident set size. The phases:

  generation  sampling the answers (KV cache)
  logprobs    log-probability passes without gradients: the reference's, and TRL's extra pass of the policy for the
              "old" log-probabilities (ours takes them from the sampling pass itself)
  reward      the reward model's pass over prompt + answer
  update      from the first gradient pass of the iteration to its end (all epochs × minibatches)
  other       the rest: tokenising, decoding, advantages, logging, data loading
  iteration   the whole iteration

"Tokens" are the answer tokens of an iteration (answers × padded answer width). FLOPs are model FLOPs of the work
that must be done (see `group_phase_flops`), so a trainer that computes more shows a lower rate. The last line of
each table is the headline: throughput per iteration, ours over TRL's (the goal is ≥ 1.5×).

    python benchmarks/group_throughput.py                       # sizes onestep and tiny, GRPO and RLOO, ours and TRL
    python benchmarks/group_throughput.py --algos grpo --sizes onestep --iterations 6 --rounds 2
    python benchmarks/group_throughput.py --no-trl              # our side only
    python benchmarks/group_throughput.py --smoke               # seconds; TRL too only if its venv already exists

On a machine shared with other work, pass `--threads 1`: with another process holding one of two cores, torch's
OpenMP threads wait on each other, and 2 threads sampled ~10× slower than 1 (both sides alike, but noisily).

Sizes: `onestep` and `tiny` both have 16 prompts × 4 answers × 40 tokens on the 4-layer width-128 Gemma of
conf/model/tiny.yaml, and differ in the update. `tiny` is our default settings: 2 epochs × 2 minibatches, so 4
optimizer steps (TRL's "steps", whose time TRL logs as step_time) per rollout. `onestep` takes one optimizer step per
rollout, as TRL's defaults do (num_iterations = 1, steps_per_generation = gradient_accumulation_steps = 1), so one of
TRL's steps is a whole iteration. The report gives seconds per iteration and per optimizer step. `smoke` is for tests.
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

# only torch and the standard library at module level: trl_group.py imports GroupClock from here in the TRL venv
from benchmarks._common import VENVS, PhaseClock, bare_trainer, ensure_venv, human_bytes, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = "trl-group"
TRL_PACKAGES = ["trl==1.16.0"]
ALGOS = ("grpo", "rloo")
PHASES = ("generation", "logprobs", "reward", "update", "other", "iteration")
GOAL = 1.5  # ours/TRL throughput per iteration the implementation aims for


class GroupClock(PhaseClock):
    """PhaseClock with the critic-free algorithms' scoring phases: `logprobs` (passes without gradients that give
    log-probabilities: the reference's, and any "old policy" pass) and `reward` (the reward model's pass).

    `timed(phase, fn, when)` times a call only when `when()` holds (e.g. gradients are off: the update's own passes
    belong to the update) and only the outermost of nested timed calls, so wrapping both a helper and the model call
    it makes counts the time once.
    """

    PHASES = ("generation", "logprobs", "reward")

    def __init__(self):
        super().__init__()
        self.inside = False

    def timed(self, phase: str, fn, when=None):
        clocked = super().timed(phase, fn)

        def wrapper(*args, **kwargs):
            if self.inside or (when is not None and not when()):
                return fn(*args, **kwargs)
            self.inside = True
            try:
                return clocked(*args, **kwargs)
            finally:
                self.inside = False

        return wrapper


def grad_off() -> bool:
    return not torch.is_grad_enabled()


# ---------------------------------------------------------------------------------------------------------------
# Sizes and FLOPs (pure)
# ---------------------------------------------------------------------------------------------------------------
def sizes() -> dict[str, dict]:
    """Model architecture and settings per size (overrides of conf/grpo and conf/rloo's defaults)."""
    from omegaconf import OmegaConf

    tiny_arch = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml").arch)
    debug = OmegaConf.load(ROOT / "conf/debug/default.yaml")
    shape = {"batch_size": 16, "group_size": 4, "response_length": 40}
    return {
        "onestep": {"arch": tiny_arch, "settings": {**shape, "epochs": 1, "num_minibatches": 1}},
        "tiny": {"arch": tiny_arch, "settings": {}},
        "smoke": {
            "arch": {**tiny_arch, **OmegaConf.to_container(debug.model.arch)},
            "settings": {"batch_size": 2, "group_size": 2, "response_length": 6, "epochs": 1, "num_minibatches": 2},
        },
    }


def group_phase_flops(
    arch: dict, vocab: int, samples: int, prompt_len: int, response_len: int, epochs: int, reference: bool = True
) -> dict[str, float]:
    """The work one GRPO/RLOO iteration must do per phase, for `samples` left-padded prompts of width P with answers
    of width R (model FLOPs as in `ppo_throughput.lm_forward_flops`).

    generation: the policy over the P + R - 1 positions that predict an answer token (a KV-cached decode), the LM
    head at the R that do; logprobs: the reference over all P + R positions with its LM head at R (none when the KL
    coefficient is 0: no reference is needed); the old policy's log-probabilities come free with sampling, so no
    policy pass is counted; reward: the reward model's backbone over P + R; update: `epochs` × (forward + 2 ×
    forward backward) of the policy.
    """
    from benchmarks.ppo_throughput import lm_forward_flops

    t = prompt_len + response_len
    policy = lm_forward_flops(arch, vocab, samples * t, (t + 1) / 2, samples * response_len)
    return {
        "generation": lm_forward_flops(arch, vocab, samples * (t - 1), t / 2, samples * response_len),
        "logprobs": policy if reference else 0.0,
        "reward": lm_forward_flops(arch, vocab, samples * t, (t + 1) / 2),
        "update": epochs * 3 * policy,
    }


def count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, or None when either is missing or zero."""
    return ours / theirs if ours and theirs else None


# ---------------------------------------------------------------------------------------------------------------
# The work: weights, tokenizer, prompts, settings
# ---------------------------------------------------------------------------------------------------------------
def load_settings(algo: str, overrides: dict, seed: int = 0):
    """Our config for `algo`: conf/<algo>/default.yaml with `overrides`."""
    from omegaconf import OmegaConf

    from salsa.config import GRPOConfig, RLOOConfig

    node = OmegaConf.load(ROOT / f"conf/{algo}/default.yaml")
    node.seed = seed  # the default interpolates the root config's seed
    config = replace({"grpo": GRPOConfig, "rloo": RLOOConfig}[algo].from_cfg(node), **overrides)
    config.check(algo)
    return config


def prepare(workdir: Path, size: dict, algos: list[str], seed: int = 0) -> dict:
    """Save policy and reward weights with the tokenizer, the prompts (text, and the token ids we make of them) and
    each algorithm's settings (`settings.json`: {algo: our config as a dict})."""
    from transformers import GemmaForSequenceClassification
    from transformers.utils import logging as hf_logging

    from salsa.data.task import synthetic_data
    from salsa.data.tokens import prompt_ids
    from salsa.models.hf import num_parameters, tiny_gemma, train_word_tokenizer
    from salsa.stages.base import task_texts

    hf_logging.disable_progress_bar()
    configs = {algo: load_settings(algo, size["settings"], seed) for algo in algos}
    data = synthetic_data(
        seed, n_pretrain=2000, n_sft=500, n_sft_val=10, n_pairs=200, n_pairs_val=10, n_eval_prompts=10
    )
    tok = train_word_tokenizer(task_texts(data))
    torch.manual_seed(seed)
    policy = tiny_gemma(tok, **size["arch"])
    reward_config = copy.deepcopy(policy.config)
    reward_config.num_labels = 1  # a scalar head
    reward = GemmaForSequenceClassification(reward_config)
    for name, model in (("policy", policy), ("reward", reward)):
        model.save_pretrained(workdir / name)
        tok.save_pretrained(workdir / name)
    # exactly batch_size prompts per algorithm (each side takes the first batch_size): our module draws all of them
    # (a permutation) every iteration and TRL's sampler a shuffle of all of them, so both roll out the same prompts
    n_prompts = max(c.batch_size for c in configs.values())
    prompts = data.prompts_train[:n_prompts]
    (workdir / "prompts.json").write_text(json.dumps(prompts))
    width = max(c.max_prompt_length for c in configs.values())
    ids = [prompt_ids(tok, p, width) for p in prompts]
    (workdir / "prompt_ids.json").write_text(json.dumps(ids))  # TRL's side checks its own tokenisation against these
    untruncated = [prompt_ids(tok, p) for p in prompts]
    if ids != untruncated:  # TRL 1.16 never truncates prompts: a longer prompt would make the work differ
        raise ValueError(f"a prompt is longer than max_prompt_length ({width}); pick shorter prompts")
    (workdir / "settings.json").write_text(json.dumps({a: asdict(c) for a, c in configs.items()}, indent=1))
    return {"parameters": num_parameters(policy), "vocab": len(tok), "configs": configs}


# ---------------------------------------------------------------------------------------------------------------
# Our side: one process running GRPOModule or RLOOModule under Lightning, phases timed from outside the math
# ---------------------------------------------------------------------------------------------------------------
def run_ours(workdir: Path, algo: str, iterations: int, out: Path) -> None:
    import salsa.algorithms.group as group
    from salsa.algorithms.grpo import GRPOModule
    from salsa.algorithms.rloo import RLOOModule
    from salsa.config import GRPOConfig, RLOOConfig
    from salsa.infra.cache import Entry
    from salsa.models.hf import load_tokenizer
    from salsa.stages.group import build_group_actors

    module_cls, config_cls = {"grpo": (GRPOModule, GRPOConfig), "rloo": (RLOOModule, RLOOConfig)}[algo]
    clock = GroupClock()

    class Timed(module_cls):
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

    settings = json.loads((workdir / "settings.json").read_text())[algo]
    config = config_cls(**{**settings, "iterations": iterations})
    policy_dir, reward_dir = (Entry("bench", n, workdir / n, {}, False) for n in ("policy", "reward"))
    actors = build_group_actors(policy_dir, policy_dir, reward_dir)
    # the reference's log-probabilities: the helper that scores them a few rows at a time (log-softmax included, as
    # TRL's timed method includes its own), and the model call itself should the module call it directly
    group.scored_logprobs = clock.timed("logprobs", group.scored_logprobs, when=grad_off)
    actors.reference_logits = clock.timed("logprobs", actors.reference_logits, when=grad_off)
    actors.policy_logits = clock.timed("logprobs", actors.policy_logits, when=grad_off)  # an old-policy pass, if any
    actors.scores = clock.timed("reward", actors.scores, when=grad_off)
    prompts = json.loads((workdir / "prompts.json").read_text())[: config.batch_size]
    module = Timed(actors, load_tokenizer(workdir / "policy"), prompts, config, judge=None)
    bare_trainer(iterations).fit(module)
    result = {
        "tool": "salsa",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "iterations": clock.iterations,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    out.write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# Orchestration and report
# ---------------------------------------------------------------------------------------------------------------
def run_side(side: str, algo: str, python: Path, workdir: Path, iterations: int, threads: int | None) -> dict:
    out = workdir / f"{algo}-{side}-{time.monotonic_ns()}.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    script = Path(__file__).resolve() if side == "ours" else Path(__file__).with_name("trl_group.py")
    cmd = [str(python), str(script)] + (["--worker"] if side == "ours" else [])
    cmd += ["--workdir", str(workdir), "--out", str(out), "--algo", algo, "--iterations", str(iterations)]
    if threads:
        cmd += ["--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    done = run_measured(cmd, env=env)
    if done.returncode or not out.exists():
        raise RuntimeError(f"{algo} {side} run failed (exit {done.returncode}):\n{done.output[-4000:]}")
    result = json.loads(out.read_text())
    result["peak_rss_bytes"] = max(result["peak_rss_bytes"], done.peak_rss_bytes)
    result["process_wall_s"], result["process_cpu_s"] = done.wall_s, done.cpu_s  # start-up and loading included
    return result


def summarise(runs: list[dict], warmup: int, arch: dict, vocab: int, config) -> dict:
    """Median seconds per phase over the measured iterations (each run's first `warmup` dropped), with tokens/s and
    achieved FLOP/s from each iteration's own shape."""
    its = [it for r in runs for it in r["iterations"][warmup:]]
    if not its:
        raise ValueError(f"no iteration left to measure: raise --iterations above --warmup ({warmup})")
    out = {"iterations_measured": len(its), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs)}
    tokens = statistics.median(it["batch"] * it["response_len"] for it in its)
    flops = [
        group_phase_flops(
            arch, vocab, it["batch"], it["prompt_len"], it["response_len"], config.epochs, config.kl_coef > 0
        )
        for it in its
    ]
    for phase in PHASES:
        secs = statistics.median(it[phase] for it in its)
        cpu = statistics.median(it[f"cpu_{phase}"] for it in its)
        work = statistics.median(sum(f.values()) if phase == "iteration" else f.get(phase, 0.0) for f in flops)
        out[phase] = {
            "seconds": secs,
            "cpu_seconds": cpu,
            "tokens_per_s": tokens / secs if secs > 0 else None,
            "tokens_per_cpu_s": tokens / cpu if cpu > 0 else None,
            "flops_per_s": work / secs if secs > 0 else None,
        }
    out["shape"] = {k: statistics.median(it[k] for it in its) for k in ("batch", "prompt_len", "response_len")}
    out["first_iteration_s"] = [r["iterations"][0]["iteration"] for r in runs]
    out["total_s"] = [sum(it["iteration"] for it in r["iterations"]) for r in runs]
    out["process_s"] = [r.get("process_wall_s", 0.0) for r in runs]
    return out


def compare(summary: dict[str, dict]) -> dict | None:
    """ours/TRL throughput per phase, by wall-clock and by CPU time (None where a phase took no time), or None
    without a TRL side. Throughput is answer tokens per second, so different answer widths are accounted for."""
    if "trl" not in summary:
        return None
    ours, trl = summary["ours"], summary["trl"]
    return {
        phase: {
            "wall": ratio(ours[phase]["tokens_per_s"], trl[phase]["tokens_per_s"]),
            "cpu": ratio(ours[phase]["tokens_per_cpu_s"], trl[phase]["tokens_per_cpu_s"]),
        }
        for phase in PHASES
    }


def report(name: str, algo: str, info: dict, summary: dict[str, dict], peak: float) -> str:
    c = info["configs"][algo]
    sides = list(summary)
    ratios = compare(summary)
    shape = summary["ours"]["shape"]

    def x(r):
        return f"{r:.2f}×" if r is not None else "-"

    lines = [
        f"## {algo.upper()}, {name}: {count(info['parameters'])} parameters per model, vocabulary {info['vocab']};"
        f" {c.batch_size} prompts × {c.group_size} answers, prompt width {shape['prompt_len']:.0f}, answers"
        f" {shape['response_len']:.0f} tokens; {c.epochs} epochs × {c.num_minibatches} minibatches, kl_coef"
        f" {c.kl_coef}; medians of " + ", ".join(f"{s}: {summary[s]['iterations_measured']} iterations" for s in sides),
        "",
        "| phase | "
        + " | ".join(f"{s} s | {s} tok/s | {s} GFLOP/s (% of matmul)" for s in sides)
        + (" | ours/TRL throughput | ours/TRL by CPU time" if ratios else "")
        + " |",
        "|---" * (1 + 3 * len(sides) + (2 if ratios else 0)) + "|",
    ]
    for phase in PHASES:
        row = [phase]
        for s in sides:
            p = summary[s][phase]
            row += [f"{p['seconds']:.3f}", f"{p['tokens_per_s']:.0f}" if p["tokens_per_s"] else "-"]
            useful = phase != "other" and p["flops_per_s"]
            row.append(f"{p['flops_per_s'] / 1e9:.1f} ({100 * p['flops_per_s'] / peak:.0f}%)" if useful else "-")
        if ratios:
            row += [x(ratios[phase]["wall"]), x(ratios[phase]["cpu"])]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| peak RSS | " + " | ".join(f"{human_bytes(summary[s]['peak_rss_bytes'])} | | " for s in sides) + "|")
    lines += ["", "| side | first iteration s, per run | all iterations s, per run | process s (start-up included) |"]
    lines.append("|---|---|---|---|")
    for s in sides:
        first = ", ".join(f"{t:.1f}" for t in summary[s]["first_iteration_s"])
        total = ", ".join(f"{t:.1f}" for t in summary[s]["total_s"])
        lines.append(f"| {s} | {first} | {total} | {', '.join(f'{t:.1f}' for t in summary[s]['process_s'])} |")
    it = summary["ours"]["iteration"]
    lines.append("")
    if ratios:
        trl = summary["trl"]["iteration"]
        wall, cpu = ratios["iteration"]["wall"], ratios["iteration"]["cpu"]
        verdict = "met" if wall is not None and wall >= GOAL else "not met"
        lines.append(
            f"per iteration: ours {it['seconds']:.3f} s ({it['tokens_per_s']:.0f} tok/s), TRL {trl['seconds']:.3f} s "
            f"({trl['tokens_per_s']:.0f} tok/s): ours/TRL {x(wall)} by wall-clock, {x(cpu)} by CPU time "
            f"(goal ≥ {GOAL}×: {verdict})"
        )
    else:
        lines.append(f"per iteration: ours {it['seconds']:.3f} s ({it['tokens_per_s']:.0f} tok/s); no TRL side")
    steps = c.epochs * c.num_minibatches  # TRL's "step" (and its logged step_time) is one optimizer step
    lines.append(
        f"per optimizer step ({steps} per iteration): "
        + ", ".join(f"{s} {summary[s]['iteration']['seconds'] / steps:.3f} s" for s in sides)
    )
    lines.append("seconds are wall-clock; CPU time is each process's own (all threads)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", default="grpo,rloo", help="comma-separated: grpo, rloo")
    parser.add_argument("--sizes", default="onestep,tiny", help="comma-separated: onestep, tiny, smoke")
    parser.add_argument("--iterations", type=int, default=6, help="iterations per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=1, help="iterations dropped from the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="ours/TRL pairs per size, alternating who goes first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--no-trl", action="store_true", help="only our side")
    parser.add_argument("--smoke", action="store_true", help="smoke size, one round; TRL only if its venv exists")
    parser.add_argument("--json", type=Path, default=None, help="also write the summaries here")
    # worker mode (internal): one of our runs in this process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--algo", choices=ALGOS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return run_ours(args.workdir, args.algo, args.iterations, args.out)
    if args.smoke:
        args.sizes, args.iterations, args.warmup, args.rounds = "smoke", 2, 1, 1
    algos = args.algos.split(",")
    if unknown := set(algos) - set(ALGOS):
        sys.exit(f"unknown algorithm(s): {', '.join(sorted(unknown))}; choose from {', '.join(ALGOS)}")

    trl_python = None
    if not args.no_trl:
        if args.smoke:
            installed = (VENVS / TRL_VENV / ".installed").exists()
            trl_python = VENVS / TRL_VENV / "bin" / "python" if installed else None
            if trl_python is None:
                print("[smoke] no TRL venv yet: our side only (a full run makes it)")
        else:
            trl_python, why = ensure_venv(TRL_VENV, TRL_PACKAGES)
            if trl_python is None:
                sys.exit(f"could not make the TRL venv: {why}")

    from benchmarks.ppo_throughput import matmul_flops_per_s

    peak = matmul_flops_per_s()
    threads = torch.get_num_threads()
    print(f"# GRPO / RLOO throughput — torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs")
    print(f"fp32 matmul rate (1024², best of 1 s): {peak / 1e9:.1f} GFLOP/s\n")
    results = {"torch": torch.__version__, "threads": threads, "matmul_flops_per_s": peak, "sizes": {}}
    table = sizes()
    for name in args.sizes.split(","):
        size = table[name]
        entry = results["sizes"][name] = {"algos": {}}
        with tempfile.TemporaryDirectory(prefix=f"group-bench-{name}-") as tmp:
            workdir = Path(tmp)
            info = prepare(workdir, size, algos)
            entry.update(parameters=info["parameters"], vocab=info["vocab"])
            for algo in algos:
                runs: dict[str, list[dict]] = {"ours": [], **({"trl": []} if trl_python else {})}
                for r in range(args.rounds):
                    order = list(runs) if r % 2 == 0 else list(reversed(runs))
                    for side in order:
                        python = trl_python if side == "trl" else Path(sys.executable)
                        runs[side].append(run_side(side, algo, python, workdir, args.iterations, args.threads))
                        print(f"[{name} {algo}] round {r + 1}/{args.rounds}: {side} done", flush=True)
                config = info["configs"][algo]
                summary = {s: summarise(v, args.warmup, size["arch"], info["vocab"], config) for s, v in runs.items()}
                print(report(name, algo, info, summary, peak) + "\n", flush=True)
                entry["algos"][algo] = {
                    "settings": asdict(config),
                    "summary": summary,
                    "ours_over_trl": compare(summary),
                    "trl_config": runs["trl"][0].get("trl_config") if trl_python else None,
                }
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
