"""Does a soup reference help DPO, GRPO and RLOO the way it helps PPO? The report of `experiment=algorithms`.

`python src/train.py -m experiment=algorithms` runs algo ∈ {ppo, dpo, grpo, rloo} × ref ∈ {sft, soup3} × 3 seeds on
the embedded task (each seed trains its own SFT ingredients and soup), every algorithm at its default settings. When
the sweep ends, `AlgorithmsReport` writes into `results/algorithms/`:

- `algorithms.csv`: one row per (algo, ref): gold-judged adjusted win rate against the same algorithm with ref=sft
  (same seed) and against SFT, mean gold and RM reward, KL to the reference, each with a 95% hierarchical bootstrap
  interval over seeds, then prompts;
- `algorithms.md`: that table, the soup's win rate per seed, and the gold reward of each algorithm's policies.

`python -m salsa.analysis.algorithms --sweep <sweep dir> --out <dir>` writes the same report from a finished sweep.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from salsa.analysis.replicate import Job, _fmt, _interval, _stack, load_jobs
from salsa.analysis.stats import comparison_scores

log = logging.getLogger("salsa")

ALGOS = ("ppo", "dpo", "grpo", "rloo")
TIE = 1e-6


def _order(job: Job) -> tuple:
    return (ALGOS.index(job.algo) if job.algo in ALGOS else len(ALGOS), job.algo, job.ref != "sft", job.ref)


def algorithm_table(jobs: Sequence[Job], per_prompt: int, n_boot: int = 2000) -> pd.DataFrame:
    """One row per (algo, ref): win rates against the algorithm's ref=sft run and against SFT, gold and RM reward,
    KL to the reference; with bootstrap intervals over seeds, then prompts."""
    groups: dict[tuple[str, str], list[Job]] = {}
    for job in sorted(jobs, key=_order):
        groups.setdefault((job.algo, job.ref), []).append(job)
    rows = []
    for (algo, ref), group in groups.items():
        group = sorted(group, key=lambda j: j.seed)
        row: dict[str, Any] = {"algo": algo, "ref": ref, "kl_coef": group[0].kl_coef, "seeds": len(group)}
        policy = _stack([j.gold("policy", per_prompt) for j in group])
        for other in ("ppo", "sft"):  # "ppo" in an evaluation is the baseline: the same algorithm with ref=sft
            if other == "ppo" and ref == "sft":
                continue
            versus = _stack([j.gold(other, per_prompt) for j in group])
            name = "baseline" if other == "ppo" else "sft"
            for k, v in _interval(comparison_scores(policy, versus, TIE), n_boot).items():
                row[f"win_vs_{name}_{k}"] = v
            if other == "ppo":
                row["win_vs_baseline_per_seed"] = [
                    float(comparison_scores(p, v, TIE).mean()) for p, v in zip(policy, versus, strict=True)
                ]
        for k, v in _interval(policy, n_boot).items():
            row[f"gold_{k}"] = v
        row["rm_reward"] = float(np.mean([j.results["rm_reward"] for j in group]))
        row["kl_to_ref"] = float(np.mean([j.results["kl_to_ref"] for j in group]))
        row["sft_gold"] = float(np.mean([j.results["sft_gold_reward"] for j in group]))
        rows.append(row)
    return pd.DataFrame(rows)


def versus_ppo(jobs: Sequence[Job], per_prompt: int, n_boot: int = 2000) -> pd.DataFrame:
    """Each algorithm's policy against PPO's with the same ref and seed: which algorithm the gold judge prefers."""
    index = {(j.algo, j.ref, j.seed): j for j in jobs}
    rows = []
    for algo in [a for a in ALGOS if a != "ppo"]:
        for ref in ("sft", "soup3"):
            seeds = sorted(s for a, r, s in index if a == algo and r == ref and ("ppo", ref, s) in index)
            if not seeds:
                continue
            scores = comparison_scores(
                _stack([index[(algo, ref, s)].gold("policy", per_prompt) for s in seeds]),
                _stack([index[("ppo", ref, s)].gold("policy", per_prompt) for s in seeds]),
                TIE,
            )
            interval = _interval(scores, n_boot)
            rows.append({"algo": algo, "ref": ref, "seeds": len(seeds), **{f"win_{k}": v for k, v in interval.items()}})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, vs_ppo: pd.DataFrame) -> str:
    lines = [
        "# Does a soup reference help DPO, GRPO and RLOO as it helps PPO?",
        "",
        "Embedded task, judge: the gold reward. Every algorithm at its default settings (`conf/<algo>/default.yaml`;",
        "KL strength in the `kl/β` column). Win rates are adjusted, (wins + ½ ties) / comparisons, in percent, with",
        "95% hierarchical bootstrap intervals over seeds, then prompts. `vs ref=sft` pairs each soup3 run with the",
        "same algorithm, settings and seed with ref=sft; every model answers with the same sampling seed.",
        "",
        "| algo | ref | kl/β | seeds | win vs ref=sft % | per seed % | win vs SFT % | gold reward | RM reward | "
        "KL to ref |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        soup = r["ref"] != "sft"
        vs_base = _fmt(r["win_vs_baseline_mean"], r["win_vs_baseline_low"], r["win_vs_baseline_high"]) if soup else "—"
        per_seed = ", ".join(f"{100 * v:.1f}" for v in r["win_vs_baseline_per_seed"]) if soup else "—"
        lines.append(
            f"| {r['algo']} | {r['ref']} | {r['kl_coef']:g} | {int(r['seeds'])} | {vs_base} | {per_seed} | "
            f"{_fmt(r['win_vs_sft_mean'], r['win_vs_sft_low'], r['win_vs_sft_high'])} | "
            f"{_fmt(r['gold_mean'], r['gold_low'], r['gold_high'], percent=False)} | {r['rm_reward']:.3f} | "
            f"{r['kl_to_ref']:.2f} |"
        )
    if not vs_ppo.empty:
        lines += [
            "",
            "## Each algorithm against PPO (same ref and seed)",
            "",
            "| algo | ref | seeds | win vs PPO % |",
            "|---|---|---|---|",
        ]
        for _, r in vs_ppo.iterrows():
            lines.append(
                f"| {r['algo']} | {r['ref']} | {int(r['seeds'])} | {_fmt(r['win_mean'], r['win_low'], r['win_high'])} |"
            )
    return "\n".join(lines) + "\n"


def write_report(jobs: Sequence[Job], per_prompt: int, out_dir: str | Path, n_boot: int = 2000) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = algorithm_table(jobs, per_prompt, n_boot)
    vs_ppo = versus_ppo(jobs, per_prompt, n_boot)
    paths = {"csv": out / "algorithms.csv", "md": out / "algorithms.md"}
    table.round(6).to_csv(paths["csv"], index=False)
    paths["md"].write_text(markdown(table, vs_ppo))
    return paths


def report(sweep_dir: Path, out_dir: Path, n_boot: int = 2000) -> dict[str, Path]:
    from salsa.runner import quiet_libraries

    quiet_libraries()
    jobs, per_prompt = load_jobs(sweep_dir)
    paths = write_report(jobs, per_prompt, out_dir, n_boot)
    log.info("algorithms report: %s", ", ".join(str(p) for p in paths.values()))
    return paths


class AlgorithmsReport(Callback):
    """At the end of `experiment=algorithms`'s sweep: the report into `out_dir`."""

    def __init__(self, out_dir: str, n_boot: int = 2000):
        self.out_dir, self.n_boot = out_dir, n_boot

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report(Path(config.hydra.sweep.dir), Path(self.out_dir), self.n_boot)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m salsa.analysis.algorithms", description="The soup-reference report across algorithms."
    )
    parser.add_argument("--sweep", required=True, help="the sweep directory of `-m experiment=algorithms`")
    parser.add_argument("--out", required=True, help="where to write algorithms.csv and algorithms.md")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap draws")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    report(Path(args.sweep), Path(args.out), args.n_boot)


if __name__ == "__main__":
    main()
