"""The small-scale replication of the paper's claims on the embedded task, where the gold reward is the judge.

`python src/train.py -m experiment=replicate` runs ref ∈ {sft, other, soup2, soup3} × a kl_coef grid × 3 seeds
(each seed trains its own SFT ingredients and PPO runs) and, when the sweep ends, `ReplicationReport` writes:

- `replication.csv`: one row per (ref, kl_coef) with gold-judged adjusted win rates against PPO (ref=sft at the
  same kl_coef and seed) and against SFT, mean gold and RM reward and KL to the reference, each with a 95%
  hierarchical bootstrap interval over seeds, then prompts;
- `replication.md`: those tables, soup3 against soup2, the reward landscape through each seed's ingredients,
  over-optimisation along PPO's iterations, and the paper's numbers beside ours;
- `frontier.png`: gold and RM reward against KL, one curve per reference;
- `forest.png`: each reference's win rate against PPO at every kl_coef, with its interval, a line at 50%.

`python -m salsa.analysis.replicate --sweep <sweep dir> --out <dir>` writes the same report from a finished sweep;
`--replot --out <dir>` draws the figures again from the `replication.csv` already in `<dir>`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from salsa.analysis.stats import comparison_scores, hierarchical_bootstrap

log = logging.getLogger("salsa")

REFS = ("sft", "other", "soup2", "soup3")
# Chegini et al. 2024 (arXiv 2411.01798), Arena-Hard adjusted win rates against PPO, GPT-4 as judge
PAPER = {
    ("soup3", "Llama2-7B"): 54.01,
    ("soup3", "Mistral-7B"): 54.40,
    ("other", "Llama2-7B"): 43.07,
}
# over-optimisation: the smoothed gold reward ends this far below its peak while the RM reward ends above its level
# at that peak
OVEROPT_DROP = 0.1


@dataclass
class Job:
    """One finished pipeline run of the sweep, with its evaluation's per-answer scores and the policy's history."""

    ref: str
    kl_coef: float  # the algorithm's KL strength: kl_coef (PPO, GRPO, RLOO) or β (DPO)
    seed: int
    results: dict[str, Any]
    answers: pd.DataFrame  # generations.csv: prompt, model (policy | sft | ppo = the ref=sft baseline), ..., gold
    history: dict[str, list[tuple[int, float]]]  # the policy's iterations (history.csv; none for DPO)
    algo: str = "ppo"
    start: str = ""  # where the policy started: a `ref=`/`init=` name (sft, soup3, ...); "" = as `ref=` says
    update: str = "frozen"  # ref.update
    rm: str = "default"  # the reward model: one (default) or a soup of N (soupN)
    task: str = "synthetic"  # data.name
    model: str = "tiny"  # model.name

    def gold(self, model: str, samples_per_prompt: int) -> np.ndarray:
        """Gold rewards of `model`'s answers as (prompts, samples per prompt)."""
        values = self.answers.loc[self.answers["model"] == model, "gold_reward"].to_numpy(dtype=float)
        return values.reshape(-1, samples_per_prompt)


def run_design(cfg) -> dict[str, str]:
    """A run's start, reference update and reward model, as `Job` records them (older sweeps lack the options: their
    defaults then)."""
    ref, init = cfg.ref, cfg.get("init") or {"name": "ref"}
    if init.get("name", "ref") != "ref":
        start = str(init["name"])
    elif str(ref.get("policy_init", "ref")) == "ref":
        start = str(ref.name)
    else:  # ref=other: an SFT ingredient (0)
        start = "sft" if int(ref.policy_init) == 0 else f"sft{int(ref.policy_init)}"
    members = int((cfg.get("rm") or {}).get("members", 1))
    return {"start": start, "update": str(ref.get("update", "frozen")), "rm": "default" if members == 1 else
            f"soup{members}"}  # fmt: skip


def load_jobs(sweep_dir: str | Path) -> tuple[list[Job], int]:
    """The sweep's finished jobs and the number of samples per prompt of their evaluation."""
    from salsa.analysis.sweep import finished_jobs
    from salsa.infra.cache import StageCache
    from salsa.stages.ppo import HISTORY, read_history

    jobs, per_prompt = [], set()
    for _, cfg, results in finished_jobs(sweep_dir):
        cache = StageCache(cfg.paths.cache_dir)
        (eval_key,) = [k.split(":", 1)[1] for k in results["stages"] if k.startswith("eval:")]
        evaluation = cache.lookup("eval", eval_key)
        algo = str(cfg.get("algo", {}).get("name", "ppo"))  # sweeps from before `algo=` existed ran PPO
        policy = cache.lookup(algo, evaluation.manifest["spec"]["policy"])
        per_prompt.add(int(cfg.eval.samples_per_prompt))
        jobs.append(
            Job(
                ref=cfg.ref.name,
                kl_coef=float(cfg[algo].beta if algo == "dpo" else cfg[algo].kl_coef),
                seed=int(cfg.seed),
                results=results,
                answers=pd.read_csv(evaluation.path / "generations.csv"),
                history=read_history(policy.path / HISTORY),
                algo=algo,
                task=str(cfg.data.name),
                model=str(cfg.model.name),
                **run_design(cfg),
            )
        )
    if len(per_prompt) > 1:
        raise ValueError(f"the sweep's jobs evaluate different numbers of samples per prompt: {per_prompt}")
    return jobs, per_prompt.pop() if per_prompt else 1


def _interval(scores: np.ndarray, n_boot: int) -> dict[str, float]:
    mean, low, high = hierarchical_bootstrap(scores, n_boot=n_boot)
    return {"mean": mean, "low": low, "high": high}


def _stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack(arrays)  # (seeds, prompts, samples per prompt)


def by_setting(jobs: Iterable[Job]) -> list[tuple[tuple[str, float], list[Job]]]:
    """The jobs grouped by (ref, kl_coef), in the report's order: `REFS`' order, then kl_coef."""
    groups: dict[tuple[str, float], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.ref, job.kl_coef), []).append(job)
    return sorted(groups.items(), key=lambda kv: (REFS.index(kv[0][0]), kv[0][1]))


def win_rates(jobs: Sequence[Job], per_prompt: int, n_boot: int = 2000, tie: float = 1e-6) -> pd.DataFrame:
    """One row per (ref, kl_coef): win rates against PPO and SFT, gold and RM reward, KL, with bootstrap intervals."""
    rows = []
    for (ref, kl), group in by_setting(jobs):
        group = sorted(group, key=lambda j: j.seed)
        row: dict[str, Any] = {"ref": ref, "kl_coef": kl, "seeds": len(group)}
        policy = _stack([j.gold("policy", per_prompt) for j in group])
        for other in ("ppo", "sft"):
            if other == "ppo" and ref == "sft":
                continue  # plain PPO is the baseline itself
            versus = _stack([j.gold(other, per_prompt) for j in group])
            for k, v in _interval(comparison_scores(policy, versus, tie), n_boot).items():
                row[f"win_vs_{other}_{k}"] = v
        for k, v in _interval(policy, n_boot).items():
            row[f"gold_{k}"] = v
        row["rm_reward"] = float(np.mean([j.results["rm_reward"] for j in group]))
        row["kl_to_ref"] = float(np.mean([j.results["kl_to_ref"] for j in group]))
        row["sft_gold"] = float(np.mean([j.results["sft_gold_reward"] for j in group]))
        rows.append(row)
    return pd.DataFrame(rows)


def head_to_head(jobs: Sequence[Job], a: str, b: str, per_prompt: int, n_boot: int = 2000) -> pd.DataFrame:
    """Win rate of ref `a`'s policy over ref `b`'s at each kl_coef, pairing runs of the same seed."""
    rows = []
    index = {(j.ref, j.kl_coef, j.seed): j for j in jobs}
    for kl in sorted({j.kl_coef for j in jobs}):
        seeds = sorted(s for r, k, s in index if r == a and k == kl and (b, kl, s) in index)
        if not seeds:
            continue
        scores = comparison_scores(
            _stack([index[(a, kl, s)].gold("policy", per_prompt) for s in seeds]),
            _stack([index[(b, kl, s)].gold("policy", per_prompt) for s in seeds]),
            1e-6,
        )
        rows.append(
            {"kl_coef": kl, "seeds": len(seeds), **{f"win_{k}": v for k, v in _interval(scores, n_boot).items()}}
        )
    return pd.DataFrame(rows)


def smooth(values: Sequence[float], window: int = 5) -> np.ndarray:
    """Trailing moving average (shorter at the start)."""
    values = np.asarray(values, dtype=float)
    return np.array([values[max(0, i - window + 1) : i + 1].mean() for i in range(len(values))])


def overoptimisation(jobs: Sequence[Job]) -> pd.DataFrame:
    """Per (ref, kl_coef): how far the smoothed gold reward ends below its peak over PPO's iterations, how much the
    RM reward rose after that peak, and in how many seeds both happened (gold fell ≥ OVEROPT_DROP while RM rose)."""
    rows = []
    with_history = [j for j in jobs if j.history.get("ppo/gold_reward") and j.history.get("ppo/rm_reward")]
    for (ref, kl), group in by_setting(with_history):
        drops, rises, both = [], [], 0
        for job in group:
            gold = smooth([v for _, v in job.history["ppo/gold_reward"]])
            rm = smooth([v for _, v in job.history["ppo/rm_reward"]])
            peak = int(np.argmax(gold))
            drop, rise = float(gold[peak] - gold[-1]), float(rm[-1] - rm[peak])
            drops.append(drop)
            rises.append(rise)
            both += drop >= OVEROPT_DROP and rise > 0
        rows.append({"ref": ref, "kl_coef": kl, "seeds": len(group), "gold_drop_from_peak": float(np.mean(drops)),
                     "rm_rise_after_gold_peak": float(np.mean(rises)), "seeds_overoptimised": both})  # fmt: skip
    return pd.DataFrame(rows)


# results.json measures reported beside the win rates, when a task's evaluation writes them: the reward model's own
# held-out scores, the share of answers that ended, and the task's metrics (data=ifeval: IFEval's strict accuracies)
MEASURES = ("rm_accuracy", "rm_gold_agreement", "ended_frac")
TASK_MEASURE_PREFIXES = ("ifeval_",)


def task_measures(jobs: Sequence[Job]) -> pd.DataFrame:
    """Per (ref, kl_coef): the mean over seeds of each measure in `MEASURES` and of every numeric results.json
    key starting with one of `TASK_MEASURE_PREFIXES`, as far as the jobs' results have them (empty when none do)."""
    keys = sorted({k for j in jobs for k, v in j.results.items() if isinstance(v, int | float)
                   and not isinstance(v, bool) and k.startswith(TASK_MEASURE_PREFIXES)})  # fmt: skip
    if not keys:
        return pd.DataFrame()
    rows = []
    for (ref, kl), group in by_setting(jobs):
        row: dict[str, Any] = {"ref": ref, "kl_coef": kl, "seeds": len(group)}
        for key in (*MEASURES, *keys):
            values = [float(j.results[key]) for j in group if j.results.get(key) is not None]
            row[key] = float(np.mean(values)) if values else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def title(jobs: Sequence[Job]) -> str:
    """The report's heading: the embedded task, or the data and model the sweep ran on."""
    settings = sorted({(j.task, j.model) for j in jobs})
    if not settings or settings == [("synthetic", "tiny")]:
        return "Does SALSA beat PPO? Replication on the embedded task"
    return "Does SALSA beat PPO? " + "; ".join(f"data={t}, model={m}" for t, m in settings)


def landscape_table(landscapes: dict[int, dict]) -> pd.DataFrame:
    """Per seed: gold and RM reward of each ingredient and of the soup, and whether the soup beats them all."""
    rows = []
    for seed, land in sorted(landscapes.items()):
        points = land["points"]
        ingredients = [k for k in points if k != "soup"]
        row: dict[str, Any] = {"seed": seed}
        for reward in ("gold_reward", "rm_reward"):
            if reward not in points["soup"]:
                continue
            best = max(points[k][reward] for k in ingredients)
            row[f"soup_{reward}"] = points["soup"][reward]
            row[f"ingredients_{reward}_mean"] = float(np.mean([points[k][reward] for k in ingredients]))
            row[f"ingredients_{reward}_best"] = best
            row[f"soup_beats_best_{reward}"] = bool(points["soup"][reward] > best)
            grid = np.asarray(land["grids"][reward], dtype=float)
            row[f"grid_max_{reward}"] = float(np.nanmax(grid))
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------
def _fmt(mean: float, low: float, high: float, percent: bool = True) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "—"
    scale = 100.0 if percent else 1.0
    return (
        f"{mean * scale:.1f} [{low * scale:.1f}, {high * scale:.1f}]"
        if percent
        else f"{mean:.3f} [{low:.3f}, {high:.3f}]"
    )


def markdown(table: pd.DataFrame, h2h: pd.DataFrame, overopt: pd.DataFrame, land: pd.DataFrame,
             measures: pd.DataFrame | None = None, heading: str = "") -> str:  # fmt: skip
    lines = [f"# {heading or 'Does SALSA beat PPO? Replication on the embedded task'}", ""]
    lines += [
        "Judge: the gold reward. Win rates are adjusted, (wins + ½ ties) / comparisons, in percent, with 95%",
        "hierarchical bootstrap intervals over seeds, then prompts. `vs PPO` pairs each run with ref=sft at the same",
        "kl_coef and seed; every model answers with the same sampling seed, so identical answers count as ties.",
        "",
        "| ref | kl_coef | seeds | win vs PPO % | win vs SFT % | gold reward | RM reward | KL to ref | SFT gold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        vs_ppo = (
            _fmt(r.get("win_vs_ppo_mean"), r.get("win_vs_ppo_low"), r.get("win_vs_ppo_high"))
            if r["ref"] != "sft"
            else "(baseline)"
        )
        lines.append(
            f"| {r['ref']} | {r['kl_coef']:g} | {int(r['seeds'])} | {vs_ppo} | "
            f"{_fmt(r['win_vs_sft_mean'], r['win_vs_sft_low'], r['win_vs_sft_high'])} | "
            f"{_fmt(r['gold_mean'], r['gold_low'], r['gold_high'], percent=False)} | {r['rm_reward']:.3f} | "
            f"{r['kl_to_ref']:.2f} | {r['sft_gold']:.3f} |"
        )
    if measures is not None and not measures.empty:
        lines += _measures_markdown(measures)
    if not h2h.empty:
        lines += [
            "",
            "## soup3 against soup2 (the same seed and kl_coef)",
            "",
            "| kl_coef | seeds | soup3 wins % |",
            "|---|---|---|",
        ]
        for _, r in h2h.iterrows():
            lines.append(
                f"| {r['kl_coef']:g} | {int(r['seeds'])} | {_fmt(r['win_mean'], r['win_low'], r['win_high'])} |"
            )
    lines += ["", "## The paper's numbers beside ours (win rate against PPO, %)", "",
              "| claim | paper (Arena-Hard, GPT-4 judge) | ours (gold judge; per kl_coef) |",
              "|---|---|---|"]  # fmt: skip
    for ref, claim in (("soup3", "SALSA (soup of 3) vs PPO"), ("other", "πother vs PPO")):
        if ref not in set(table["ref"]):
            continue
        paper = ", ".join(f"{m}: {v:.2f}" for (r, m), v in PAPER.items() if r == ref)
        ours = ", ".join(
            f"β={r['kl_coef']:g}: {r['win_vs_ppo_mean'] * 100:.1f}" for _, r in table[table["ref"] == ref].iterrows()
        )
        lines.append(f"| {claim} | {paper} | {ours} |")
    if not h2h.empty:
        lines.append('| 3 ingredients beat 2 | soup3 > soup2 | see "soup3 against soup2" |')
    if not land.empty:
        lines += ["", "## Reward landscape through each seed's three ingredients", "",
                  "| seed | soup gold | ingredients' gold (mean / best) | soup RM | ingredients' RM (mean / best) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for _, r in land.iterrows():
            lines.append(
                f"| {r['seed']} | {r.get('soup_gold_reward', float('nan')):.3f} | "
                f"{r.get('ingredients_gold_reward_mean', float('nan')):.3f} / "
                f"{r.get('ingredients_gold_reward_best', float('nan')):.3f} | {r['soup_rm_reward']:.3f} | "
                f"{r['ingredients_rm_reward_mean']:.3f} / {r['ingredients_rm_reward_best']:.3f} |"
            )
    if not overopt.empty:
        lines += [
            "",
            "## Over-optimisation along PPO's iterations",
            "",
            "Smoothed (5-iteration) gold reward: drop from its peak to the last iteration; RM reward: rise after the "
            f"gold peak. A seed counts as over-optimised when gold fell by ≥ {OVEROPT_DROP} while RM rose.",
            "",
            "| ref | kl_coef | seeds | gold drop from peak | RM rise after gold peak | over-optimised seeds |",
            "|---|---|---|---|---|---|",
        ]
        for _, r in overopt.iterrows():
            lines.append(f"| {r['ref']} | {r['kl_coef']:g} | {int(r['seeds'])} | {r['gold_drop_from_peak']:.3f} | "
                         f"{r['rm_rise_after_gold_peak']:.3f} | {r['seeds_overoptimised']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _measures_markdown(measures: pd.DataFrame) -> list[str]:
    """The task-measures table: one row per (ref, kl_coef), a column per measure (means over seeds)."""
    keys = [k for k in measures.columns if k not in ("ref", "kl_coef", "seeds")]
    lines = ["", "## The task's own measures (means over seeds)", "",
             "Reward model: held-out accuracy against the raters' labels and agreement with the gold reward; "
             "`ended_frac`: share of the policy's answers that ended; `ifeval_{prompt,instruction}_strict_{model}`: "
             "IFEval's strict accuracies of the policy, the SFT model and the PPO baseline.", "",
             "| ref | kl_coef | seeds | " + " | ".join(f"`{k}`" for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]  # fmt: skip
    for _, r in measures.iterrows():
        cells = ["—" if pd.isna(r[k]) else f"{r[k]:.3f}" for k in keys]
        lines.append(f"| {r['ref']} | {r['kl_coef']:g} | {int(r['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def write_report(jobs: Sequence[Job], per_prompt: int, out_dir: str | Path, landscapes: dict[int, dict] | None = None,
                 n_boot: int = 2000) -> dict[str, Path]:  # fmt: skip
    """Write replication.csv, replication.md, frontier.png and forest.png into `out_dir` (and `measures.csv` when
    the jobs' evaluation reports task measures, `task_measures`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = win_rates(jobs, per_prompt, n_boot)
    h2h = head_to_head(jobs, "soup3", "soup2", per_prompt, n_boot)
    overopt = overoptimisation(jobs)
    land = landscape_table(landscapes or {})
    measures = task_measures(jobs)
    paths = {"csv": out / "replication.csv", "md": out / "replication.md"}
    table.round(6).to_csv(paths["csv"], index=False)
    if not measures.empty:
        paths["measures"] = out / "measures.csv"
        measures.round(6).to_csv(paths["measures"], index=False)
    paths["md"].write_text(markdown(table, h2h, overopt, land, measures, title(jobs)))
    return {**paths, **write_figures(table, out)}


def write_figures(table: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """`frontier.png` (gold and RM reward against KL, one curve per reference through its β values) and
    `forest.png` (each soup's and πother's win rate against PPO at every β, with its 95% interval)."""
    from salsa.analysis.plots import forest_figure, frontier_figure, save_png

    out = Path(out_dir)
    curve = table.rename(columns={"gold_mean": "gold_reward"})[
        ["ref", "kl_coef", "kl_to_ref", "rm_reward", "gold_reward"]
    ]
    arms = table.sort_values(["ref", "kl_coef"]).assign(
        label=lambda t: [f"ref={ref}, β={beta:g}" for ref, beta in zip(t["ref"], t["kl_coef"], strict=True)]
    )
    return {
        "png": save_png(frontier_figure(curve), out / "frontier.png", dpi=90),
        "forest": save_png(forest_figure(arms, label="label", value="win_vs_ppo"), out / "forest.png", dpi=100),
    }


def replot(out_dir: str | Path) -> dict[str, Path]:
    """Draw the figures again from the `replication.csv` a report wrote into `out_dir`."""
    return write_figures(pd.read_csv(Path(out_dir) / "replication.csv"), out_dir)


def seed_landscapes(sweep_dir: str | Path, conf_dir: Path) -> dict[int, dict]:
    """The reward landscape through each seed's ingredients (built once, then cached like any stage)."""
    from salsa.infra.context import Context
    from salsa.infra.tracking import Tracker
    from salsa.stages.landscape import run_landscape

    defaults = OmegaConf.load(conf_dir / "landscape.yaml").landscape
    out: dict[int, dict] = {}
    for config_file in sorted(Path(sweep_dir).glob("*/resolved_config.yaml")):
        cfg = OmegaConf.load(config_file)
        if int(cfg.seed) in out or cfg.ref.name != "soup3":
            continue
        cfg.landscape = defaults
        entry = run_landscape(Context.from_cfg(cfg, Tracker(None)))
        out[int(cfg.seed)] = json.loads((entry.path / "landscape.json").read_text())
    return out


class ReplicationReport(Callback):
    """At the end of `experiment=replicate`'s sweep: landscapes per seed, then the report into `out_dir`."""

    def __init__(self, out_dir: str, landscape: bool = True, n_boot: int = 2000):
        self.out_dir, self.landscape, self.n_boot = out_dir, landscape, n_boot

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        report(sweep_dir, Path(self.out_dir), self.landscape, self.n_boot)


def report(sweep_dir: Path, out_dir: Path, landscape: bool = True, n_boot: int = 2000) -> dict[str, Path]:
    from salsa.runner import quiet_libraries

    quiet_libraries()
    from salsa.config import CONF_DIR

    jobs, per_prompt = load_jobs(sweep_dir)
    landscapes = seed_landscapes(sweep_dir, CONF_DIR) if landscape else {}
    paths = write_report(jobs, per_prompt, out_dir, landscapes, n_boot)
    log.info("replication report: %s", ", ".join(str(p) for p in paths.values()))
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m salsa.analysis.replicate", description="The replication report of a sweep."
    )
    parser.add_argument("--sweep", help="the sweep directory of `python src/train.py -m experiment=replicate`")
    parser.add_argument(
        "--out", required=True, help="where to write replication.csv, replication.md, frontier.png, forest.png"
    )
    parser.add_argument("--no-landscape", action="store_true", help="skip the per-seed reward landscapes")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap draws")
    parser.add_argument(
        "--replot", action="store_true", help="only draw the figures again, from --out's replication.csv"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if args.replot:
        replot(args.out)
    elif not args.sweep:
        parser.error("--sweep is required (or --replot)")
    else:
        report(Path(args.sweep), Path(args.out), not args.no_landscape, args.n_boot)


if __name__ == "__main__":
    main()
