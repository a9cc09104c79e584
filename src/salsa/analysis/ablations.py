"""Where does SALSA's gain come from? The report of `experiment=ablations`.

Each run of the three sweeps of `conf/experiment/ablations.yaml` is one *arm*: where the policy starts, its KL
anchor (`ref=`), how the anchor moves (`ref.update`), and the reward model (one, or a soup). Every run's evaluation
also answers with the plain-PPO baseline of its seed (start = anchor = SFT ingredient 0, frozen, the same reward
model), so each arm is compared with PPO on the same prompts and sampling seed; arms of different runs are compared
by pairing runs of the same seed. `python -m salsa.analysis.ablations --sweep <dir> [--sweep <dir> ...] --out <dir>`
writes into `<dir>`:

- `ablations.csv`: one row per arm: gold-judged win rate against its plain-PPO baseline and against SFT, gold
  reward, gold reward minus the baseline's, RM reward, KL to the (final) reference, reward-model accuracy; 95%
  hierarchical bootstrap intervals over seeds, then prompts;
- `ablations.md`: that table; the start × anchor decomposition of SALSA's gain over PPO (how much of it the soup
  start alone and the soup anchor alone give, with intervals); moving anchors against the frozen SFT and soup
  anchors; reward-model soups against one reward model; and the over-optimisation table (gold against RM reward
  along the iterations);
- `forest.png`: each arm's win rate against PPO with its interval, a line at 50%.

`--replot --out <dir>` draws the figure again from the `ablations.csv` already in `<dir>`, without the sweeps.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from salsa.analysis.replicate import Job, _fmt, _interval, _stack, load_jobs, smooth
from salsa.analysis.stats import bootstrap_draws, comparison_scores

log = logging.getLogger("salsa")

TIE = 1e-6
OVEROPT_DROP = 0.1  # a smoothed gold reward this far below its peak at the end counts as over-optimised
GRID_KL = 0.05  # the ablations' KL coefficient (ppo.kl_coef's default); an arm at another one names it


@dataclass(frozen=True, order=True)
class Arm:
    start: str
    anchor: str
    update: str = "frozen"
    rm: str = "default"
    kl_coef: float = GRID_KL

    @property
    def label(self) -> str:
        text = f"start {self.start}, anchor {self.anchor}"
        if self.update != "frozen":
            text += f" ({self.update})"
        text += "" if self.rm == "default" else f", rm {self.rm}"
        return text + ("" if self.kl_coef == GRID_KL else f", β {self.kl_coef:g}")

    @property
    def is_ppo(self) -> bool:
        """Plain PPO (start = anchor = SFT ingredient 0, frozen), with whichever reward model and β: its own
        baseline (its run's `ppo` answers are its own)."""
        return self.start == self.anchor == "sft" and self.update == "frozen"


PPO = Arm("sft", "sft")


def arm_of(job: Job) -> Arm:
    return Arm(job.start or job.ref, job.ref, job.update, job.rm, float(job.kl_coef))


def by_arm(jobs: Sequence[Job]) -> dict[Arm, dict[int, Job]]:
    """{arm: {seed: job}}; a repeated (arm, seed) — e.g. `init=sft ref=sft` beside `init=ref ref=sft`, the same
    cached stages — keeps the first."""
    arms: dict[Arm, dict[int, Job]] = {}
    for job in jobs:
        arms.setdefault(arm_of(job), {}).setdefault(job.seed, job)
    return dict(sorted(arms.items()))


def paired(a: dict[int, Job], b: dict[int, Job], model_a: str, model_b: str, per_prompt: int):
    """Gold rewards (seeds × prompts × samples) of `model_a` in `a`'s runs and `model_b` in `b`'s, seeds in both."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None, None, []
    return (
        _stack([a[s].gold(model_a, per_prompt) for s in seeds]),
        _stack([b[s].gold(model_b, per_prompt) for s in seeds]),
        seeds,
    )


def arm_table(jobs: Sequence[Job], per_prompt: int, n_boot: int = 2000) -> pd.DataFrame:
    """One row per arm: win rates against its plain-PPO baseline and SFT, gold reward and its gain over the
    baseline, RM reward, KL and the reward model's held-out accuracy."""
    rows = []
    for arm, runs in by_arm(jobs).items():
        seeds = sorted(runs)
        row: dict[str, Any] = {**arm.__dict__, "arm": arm.label, "seeds": len(seeds)}
        policy = _stack([runs[s].gold("policy", per_prompt) for s in seeds])
        for other in ("ppo", "sft"):
            if other == "ppo" and arm.is_ppo:
                continue  # plain PPO (with one reward model or a soup) is its own baseline
            versus = _stack([runs[s].gold(other, per_prompt) for s in seeds])
            for k, v in _interval(comparison_scores(policy, versus, TIE), n_boot).items():
                row[f"win_vs_{other}_{k}"] = v
            if other == "ppo":
                for k, v in _interval(policy - versus, n_boot).items():
                    row[f"gold_gain_{k}"] = v
                row["win_vs_ppo_per_seed"] = [
                    round(float(comparison_scores(p, b, TIE).mean()), 3) for p, b in zip(policy, versus, strict=True)
                ]
        for k, v in _interval(policy, n_boot).items():
            row[f"gold_{k}"] = v
        for key in ("rm_reward", "kl_to_ref", "rm_accuracy", "rm_gold_agreement"):
            values = [runs[s].results.get(key) for s in seeds]
            row[key] = float(np.mean(values)) if all(v is not None for v in values) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def decomposition(jobs: Sequence[Job], per_prompt: int, n_boot: int = 2000) -> pd.DataFrame:
    """SALSA's gold gain over PPO split into start and anchor: for the arms (start, anchor) ∈ {sft, soup3}², the gold
    reward gain over each run's own plain-PPO baseline of the soup start alone, the soup anchor alone, both (SALSA)
    and the interaction (both − start − anchor); and the share of SALSA's gain each one alone gives. Intervals come
    from one set of bootstrap draws (the same seeds and prompts for every effect), over the seeds all three arms
    share."""
    arms = by_arm([j for j in jobs if j.update == "frozen" and j.rm == "default"])
    want = {"start": Arm("soup3", "sft"), "anchor": Arm("sft", "soup3"), "both": Arm("soup3", "soup3")}
    if any(a not in arms for a in want.values()):
        return pd.DataFrame()
    seeds = sorted(set.intersection(*(set(arms[a]) for a in want.values())))
    gains = {
        name: _stack([arms[a][s].gold("policy", per_prompt) - arms[a][s].gold("ppo", per_prompt) for s in seeds])
        for name, a in want.items()
    }
    gains["interaction"] = gains["both"] - gains["start"] - gains["anchor"]
    draws = {name: bootstrap_draws(g, n_boot) for name, g in gains.items()}  # same seed: same resampling indices
    rows = []
    for name in ("start", "anchor", "both", "interaction"):
        mean, (low, high) = float(gains[name].mean()), np.quantile(draws[name], [0.025, 0.975])
        row = {"effect": name, "seeds": len(seeds), "gold_gain_mean": mean, "gold_gain_low": low,
               "gold_gain_high": high}  # fmt: skip
        if name in ("start", "anchor"):
            share = draws[name] / draws["both"]
            row["share_of_salsa"] = mean / float(gains["both"].mean())
            row["share_low"], row["share_high"] = (float(q) for q in np.quantile(share, [0.025, 0.975]))
        rows.append(row)
    return pd.DataFrame(rows)


def head_to_head(jobs: Sequence[Job], pairs: Sequence[tuple[Arm, Arm]], per_prompt: int, n_boot: int = 2000):
    """Win rate and gold gain of arm a's policy over arm b's, pairing runs of the same seed."""
    arms = by_arm(jobs)
    rows = []
    for a, b in pairs:
        if a not in arms or b not in arms:
            continue
        pa, pb, seeds = paired(arms[a], arms[b], "policy", "policy", per_prompt)
        if not seeds:
            continue
        row = {"arm": a.label, "versus": b.label, "seeds": len(seeds)}
        row.update({f"win_{k}": v for k, v in _interval(comparison_scores(pa, pb, TIE), n_boot).items()})
        row.update({f"gold_gain_{k}": v for k, v in _interval(pa - pb, n_boot).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def overoptimisation(jobs: Sequence[Job]) -> pd.DataFrame:
    """Per arm: the gold and RM reward at the first and last iteration (smoothed), how far the gold reward ends
    below its peak and how much the RM reward rose after it, and in how many seeds both happened."""
    rows = []
    for arm, runs in by_arm(jobs).items():
        series = [(r.history.get("ppo/gold_reward"), r.history.get("ppo/rm_reward")) for r in runs.values()]
        series = [(g, m) for g, m in series if g and m]
        if not series:
            continue
        stats = []
        for g, m in series:
            gold, rm = smooth([v for _, v in g]), smooth([v for _, v in m])
            peak = int(np.argmax(gold))
            stats.append((gold[0], gold[-1], rm[0], rm[-1], gold[peak] - gold[-1], rm[-1] - rm[peak]))
        s = np.array(stats)
        rows.append({
            "arm": arm.label, "seeds": len(series), "gold_first": s[:, 0].mean(), "gold_last": s[:, 1].mean(),
            "rm_first": s[:, 2].mean(), "rm_last": s[:, 3].mean(), "gold_drop_from_peak": s[:, 4].mean(),
            "rm_rise_after_gold_peak": s[:, 5].mean(),
            "seeds_overoptimised": int(((s[:, 4] >= OVEROPT_DROP) & (s[:, 5] > 0)).sum()),
        })  # fmt: skip
    return pd.DataFrame(rows)


def comparisons(arms: Sequence[Arm] = ()) -> dict[str, list[tuple[Arm, Arm]]]:
    """The head-to-head pairs; `arms` (those the sweeps hold) add the moving anchors against plain PPO at every
    smaller KL coefficient run: does a moving anchor only weaken the penalty?"""
    soup, sft = Arm("soup3", "soup3"), PPO
    moving = [Arm("sft", "sft", u) for u in ("ema", "sync")]
    weaker = sorted(a for a in arms if a.is_ppo and a.rm == "default" and a.kl_coef < GRID_KL)
    return {
        "moving": [(m, ref) for m in moving for ref in (sft, soup)],
        "penalty": [(m, ref) for m in moving for ref in weaker],
        "rm_soup": [(Arm(a.start, a.anchor, rm="soup3"), a) for a in (sft, soup)]
        + [(Arm("soup3", "soup3", rm="soup3"), Arm("sft", "sft", rm="soup3"))],
    }


def _table(df: pd.DataFrame, columns: dict[str, Any]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(f(r)) for f in columns.values()) + " |")
    return lines


def _ci(r, prefix: str, percent: bool) -> str:
    return _fmt(r.get(f"{prefix}_mean"), r.get(f"{prefix}_low"), r.get(f"{prefix}_high"), percent)


def markdown(table: pd.DataFrame, parts: pd.DataFrame, versus: dict[str, pd.DataFrame], over: pd.DataFrame) -> str:
    lines = [
        "# Where does SALSA's gain come from?",
        "",
        "Gold-judged win rates (%) and gold-reward gains, 95% hierarchical bootstrap intervals over seeds, then",
        "prompts. Every arm is compared with the plain-PPO baseline of its own seed (start = anchor = SFT ingredient",
        "0, frozen, the same reward model).",
        "",
        "## Every arm",
        "",
    ]
    lines += _table(table, {
        "arm": lambda r: r["arm"], "seeds": lambda r: r["seeds"],
        "win vs PPO": lambda r: _ci(r, "win_vs_ppo", True), "per seed": lambda r: r.get("win_vs_ppo_per_seed", "—"),
        "gold − PPO's": lambda r: _ci(r, "gold_gain", False), "win vs SFT": lambda r: _ci(r, "win_vs_sft", True),
        "gold": lambda r: _ci(r, "gold", False), "RM reward": lambda r: f"{r['rm_reward']:.3f}",
        "KL": lambda r: f"{r['kl_to_ref']:.2f}", "RM acc.": lambda r: f"{r['rm_accuracy']:.3f}",
    })  # fmt: skip
    if not parts.empty:
        lines += ["", "## Start or anchor? SALSA's gold gain over PPO, decomposed", ""]
        lines += _table(parts, {
            "effect": lambda r: r["effect"], "seeds": lambda r: r["seeds"],
            "gold gain over PPO": lambda r: _ci(r, "gold_gain", False),
            "share of SALSA's gain": lambda r: "—" if pd.isna(r.get("share_of_salsa")) else
            f"{r['share_of_salsa'] * 100:.0f}% [{r['share_low'] * 100:.0f}%, {r['share_high'] * 100:.0f}%]",
        })  # fmt: skip
        lines += ["", "start: soup start, SFT anchor; anchor: SFT start, soup anchor; both: SALSA; interaction:",
                  "both − start − anchor. Shares are ratios of bootstrap means drawn together; wide when SALSA's own",
                  "gain is small."]  # fmt: skip
    titles = {
        "moving": "Moving anchors against frozen ones",
        "penalty": "Moving anchors against plain PPO with a weaker KL penalty",
        "rm_soup": "A soup of reward models against one",
    }
    for name, df in versus.items():
        if df.empty:
            continue
        lines += ["", f"## {titles[name]}", ""]
        lines += _table(df, {
            "arm": lambda r: r["arm"], "versus": lambda r: r["versus"], "seeds": lambda r: r["seeds"],
            "win": lambda r: _ci(r, "win", True), "gold gain": lambda r: _ci(r, "gold_gain", False),
        })  # fmt: skip
    if not over.empty:
        lines += ["", "## Over-optimisation: gold and RM reward along the iterations (5-iteration moving average)", ""]
        lines += _table(over, {
            "arm": lambda r: r["arm"], "seeds": lambda r: r["seeds"],
            "gold first → last": lambda r: f"{r['gold_first']:.3f} → {r['gold_last']:.3f}",
            "RM first → last": lambda r: f"{r['rm_first']:.3f} → {r['rm_last']:.3f}",
            "gold drop from peak": lambda r: f"{r['gold_drop_from_peak']:.3f}",
            "RM rise after gold peak": lambda r: f"{r['rm_rise_after_gold_peak']:.3f}",
            f"seeds over-optimised (drop ≥ {OVEROPT_DROP})": lambda r: r["seeds_overoptimised"],
        })  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(jobs: Sequence[Job], per_prompt: int, out_dir: str | Path, n_boot: int = 2000) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = arm_table(jobs, per_prompt, n_boot)
    parts = decomposition(jobs, per_prompt, n_boot)
    pairs_by_name = comparisons(list(by_arm(jobs)))
    versus = {name: head_to_head(jobs, pairs, per_prompt, n_boot) for name, pairs in pairs_by_name.items()}
    paths = {"csv": out / "ablations.csv", "md": out / "ablations.md"}
    table.round(6).to_csv(paths["csv"], index=False)
    paths["md"].write_text(markdown(table, parts, versus, overoptimisation(jobs)))
    return {**paths, **write_figures(table, out)}


def write_figures(table: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """`forest.png`: every arm's gold-judged win rate against its plain-PPO baseline, with its 95% interval."""
    from salsa.analysis.plots import forest_figure, save_png

    fig = forest_figure(table, label="arm", value="win_vs_ppo")
    return {"png": save_png(fig, Path(out_dir) / "forest.png", dpi=100)}


def replot(out_dir: str | Path) -> dict[str, Path]:
    """Draw the figures again from the `ablations.csv` a report wrote into `out_dir`."""
    return write_figures(pd.read_csv(Path(out_dir) / "ablations.csv"), out_dir)


def report(sweeps: Sequence[Path], out_dir: Path, n_boot: int = 2000) -> dict[str, Path]:
    from salsa.runner import quiet_libraries

    quiet_libraries()
    jobs, per_prompt = [], set()
    for sweep in sweeps:
        found, n = load_jobs(sweep)
        jobs += found
        per_prompt.add(n)
    if len(per_prompt) != 1:
        raise ValueError(f"the sweeps evaluate different numbers of samples per prompt: {per_prompt}")
    paths = write_report(jobs, per_prompt.pop(), out_dir, n_boot)
    log.info("ablations report: %s", ", ".join(str(p) for p in paths.values()))
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m salsa.analysis.ablations", description="Where SALSA's gain comes from: the ablations report."
    )
    parser.add_argument("--sweep", action="append", help="a sweep directory (repeat for several)")
    parser.add_argument("--out", required=True, help="where to write ablations.csv, ablations.md and forest.png")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap draws")
    parser.add_argument("--replot", action="store_true", help="only draw forest.png again, from --out's ablations.csv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if args.replot:
        replot(args.out)
    elif not args.sweep:
        parser.error("--sweep is required (or --replot)")
    else:
        report([Path(s) for s in args.sweep], Path(args.out), args.n_boot)


if __name__ == "__main__":
    main()
