"""Why does the reward model reach the held-out accuracy it does? Its learning curve on the embedded task.

Trains reward models exactly as the `rm` stage does (same dataset, module, loss, optimizer and schedule), from a
given start checkpoint, while one setting at a time varies from `conf/rm/default.yaml`: the number of training pairs
(more pairs drawn from the same generator, so smaller sets are prefixes of larger ones), the passes over them, the
learning rate, and the start (the pretrained base, an SFT model, a wider or deeper base). Each model is scored on the
task's held-out pairs: accuracy against the noisy raters' labels and agreement with the gold reward, beside the
ceiling a perfect judge of the gold would reach against those labels.

    python -m salsa.analysis.rm_curve --start base=logs/cache/base/<key> --out results/rm

writes `rm_curve.csv` (one row per reward model), `rm_curve.md` (the tables and the commands) and `rm_curve.png`
(held-out accuracy and gold agreement against the number of training pairs); `--replot --out <dir>` draws the figure
again from the `rm_curve.csv` already in `<dir>`.
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from salsa.config import CONF_DIR
from salsa.data.synthetic import Pair, SyntheticTask
from salsa.models.hf import load_reward_model, load_tokenizer, num_parameters
from salsa.models.prompt_use import mismatched
from salsa.stages.lm import planned_loader
from salsa.stages.rm import PairDataset, RewardModule, pair_batch

DEFAULTS = CONF_DIR / "rm" / "default.yaml"


@dataclass
class Point:
    start: str
    parameters: int
    pairs: int
    epochs: int
    lr: float
    seed: int
    steps: int
    train_accuracy: float  # on the training pairs' labels (end of training)
    accuracy: float  # held-out pairs, against the raters' labels
    gold_agreement: float  # held-out pairs, against the sign of the gold margin
    seconds: float
    labels: str = "raters"  # what the model was trained on: the raters' labels, or the gold reward's preferences
    score: str = "last"  # rm.score: the head at the last token, or averaged over the answer
    head_lr: float | None = None  # rm.head_lr (None: lr)
    heldout: str = "val"  # which held-out pairs: the task's validation pairs (500), or fresh ones never looked at
    accuracy_shuffled: float = math.nan  # held-out accuracy with each pair scored after another pair's prompt


def gold_labelled(pair: Pair) -> Pair:
    """The pair with the gold reward's preference as its label (chosen = the higher gold reward)."""
    if pair.gold_margin >= 0:
        return pair
    return Pair(pair.prompt, pair.rejected, pair.chosen, pair.rejected_ended, pair.chosen_ended, -pair.gold_margin)


def label_ceiling(pairs: list[Pair], temperature: float = 1.0) -> float:
    """Expected accuracy against the raters' labels of a judge that always prefers the higher gold reward: a rater
    agrees with the gold with probability σ(|margin| / temperature)."""
    return statistics.fmean(1.0 / (1.0 + math.exp(-abs(p.gold_margin) / temperature)) for p in pairs)


@torch.no_grad()
def pair_accuracy(model, dataset: PairDataset, pad_id: int, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy against the labels, agreement with the gold margin's sign) of `model` on `dataset`."""
    model.eval()
    module = RewardModule(model, lr=0.0)
    hits = agree = n = 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=partial(pair_batch, pad_id=pad_id)):
        chosen, rejected = module(batch)
        hits += int((chosen > rejected).sum())
        agree += int(((chosen > rejected) == (batch["gold_margin"] > 0)).sum())
        n += chosen.numel()
    return hits / n, agree / n


def train_point(
    start: str,
    path: Path,
    pairs: list[Pair],
    val: list[Pair],
    hp,
    seed: int,
    labels: str = "raters",
    heldout: str = "val",
) -> Point:
    """One reward model, trained the way the `rm` stage trains it."""
    t0 = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    tok = load_tokenizer(path)
    model = load_reward_model(path)
    model.config.pad_token_id = tok.pad_token_id
    score = str(hp.get("score", "last"))
    if score != "last":
        model.config.score_pooling = score
    model.train()
    train = PairDataset(tok, pairs, hp.max_prompt_length, hp.max_response_length)
    loader = planned_loader(train, hp, partial(pair_batch, pad_id=tok.pad_token_id), seed)
    steps = len(loader.batch_sampler.plan)
    head_lr = hp.get("head_lr")
    module = RewardModule(
        model, hp.lr, hp.center_coef, head_lr=head_lr, weight_decay=hp.weight_decay, warmup_steps=hp.warmup_steps,
        total_steps=steps, seed=seed,
    )  # fmt: skip
    trainer = pl.Trainer(  # the plan is served `ckpt_every` batches per Lightning epoch, as in the stage
        accelerator="cpu", devices=1, max_epochs=loader.batch_sampler.num_chunks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    train_acc, _ = pair_accuracy(model, train, tok.pad_token_id)
    held = PairDataset(tok, val, hp.max_prompt_length, hp.max_response_length)
    acc, gold = pair_accuracy(model, held, tok.pad_token_id)
    shuffled = [replace(p, prompt=q) for p, q in zip(val, mismatched([p.prompt for p in val]), strict=True)]
    acc_shuffled, _ = pair_accuracy(
        model, PairDataset(tok, shuffled, hp.max_prompt_length, hp.max_response_length), tok.pad_token_id
    )
    return Point(
        start, num_parameters(model), len(pairs), int(hp.epochs), float(hp.lr), seed, steps, train_acc, acc, gold,
        time.perf_counter() - t0, labels, score, None if head_lr is None else float(head_lr), heldout, acc_shuffled,
    )  # fmt: skip


def answer_features(
    pair_prompt: str, answer: str, ended: bool, vocab: dict[str, int], extra: list[str]
) -> torch.Tensor:
    """Word counts of an answer, its length and whether it ended, plus the named gold-reward features (which may
    depend on the prompt)."""
    from salsa.data.synthetic import gold_components

    x = torch.zeros(len(vocab) + 2 + len(extra), dtype=torch.float64)
    for w in answer.split():
        x[vocab[w]] += 1
    x[len(vocab)], x[len(vocab) + 1] = len(answer.split()), float(ended)
    if extra:
        parts = gold_components(pair_prompt, answer, ended)
        for i, name in enumerate(extra):
            x[len(vocab) + 2 + i] = parts[name]
    return x


def linear_baseline(train: list[Pair], val: list[Pair], extra: list[str], l2: float = 1e-3) -> tuple[float, float]:
    """(train, held-out) accuracy of a Bradley–Terry logistic regression on the difference of `answer_features`:
    what a linear judge of the answer's words (and of the named gold features) gets from the same labels."""
    from salsa.data.synthetic import vocabulary

    vocab = {w: i for i, w in enumerate(vocabulary())}

    def diff(pairs: list[Pair]) -> torch.Tensor:
        return torch.stack([
            answer_features(p.prompt, p.chosen, p.chosen_ended, vocab, extra)
            - answer_features(p.prompt, p.rejected, p.rejected_ended, vocab, extra)
            for p in pairs
        ])  # fmt: skip

    x, xv = diff(train), diff(val)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(x @ w)).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x @ w) > 0).double().mean()), float(((xv @ w) > 0).double().mean())


def grid(
    default_pairs: int, sizes: list[int], lrs: list[float], epochs: list[int], starts: list[str],
    default_epochs: int = 1,
):  # fmt: skip
    """(start, pairs, epochs, lr) of every point: each axis varied alone around the default."""
    base = starts[0]
    seen = []
    for n in sizes:
        seen.append((base, n, default_epochs, None))
    for e in epochs:
        seen.append((base, default_pairs, e, None))
    for lr in lrs:
        seen.append((base, default_pairs, default_epochs, lr))
    for s in starts[1:]:
        seen.append((s, default_pairs, default_epochs, None))
    return list(dict.fromkeys(seen))


def _field(kind: str, text: str):
    """A csv cell as the `Point` field of type `kind` (a string annotation) holds it."""
    if kind.endswith("| None"):
        return None if text == "" else _field(kind.removesuffix("| None").strip(), text)
    return {"int": int, "float": float}.get(kind, str)(text)


def read_points(out: Path) -> tuple[list[Point], list[str]]:
    """The points and commands of an earlier study in `out` (none if there is none)."""
    if not (out / "rm_curve.csv").is_file():
        return [], []
    types = dict(Point.__annotations__)
    points = []
    with open(out / "rm_curve.csv", newline="") as f:
        for row in csv.DictReader(f):
            points.append(Point(**{k: _field(types[k], v) for k, v in row.items()}))
    commands = (out / "commands.txt").read_text().splitlines() if (out / "commands.txt").is_file() else []
    return points, commands


BASELINES = {  # linear judges trained on the same 3,000 pairs: what a reward model should at least reach
    "answer words, length, ended": [],
    "+ coverage of the asked nouns": ["coverage"],
    "+ relevance to the asked topic": ["relevance"],
    "+ all seven gold features": ["coverage", "relevance", "sentiment", "ending", "length", "repetition", "grammar"],
}


def write_report(
    points: list[Point], ceiling: float, rater_gold: float, out: Path, commands: list[str],
    baselines: dict[str, tuple[float, float]] | None = None,
) -> None:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "commands.txt").write_text("".join(c + "\n" for c in commands))
    with open(out / "rm_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        w.writeheader()
        for p in points:
            w.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(p).items()})
    lines = [
        "# Reward-model learning curve (embedded task)",
        "",
        *(f"    {c}" for c in commands),
        "",
        f"Held-out pairs: a judge that always prefers the higher gold reward would reach **{ceiling:.3f}** accuracy",
        f"against the raters' labels; the raters themselves agree with the gold on {rater_gold:.3f} of them.",
        "",
        "Columns: `score` = `rm.score` (last token, or mean over the answer), `head lr` = `rm.head_lr` (– : `lr`),",
        "`held-out` = the task's 500 validation pairs (`val`), or fresh pairs no setting was chosen on (`fresh`);",
        "`shuffled prompts` = held-out accuracy with each pair scored after another pair's prompt (a reward model",
        "that judges answers without reading the question loses nothing there).",
        "",
        "| start | parameters | labels | score | pairs | epochs | lr | head lr | seed | steps | train acc. | held-out "
        "| held-out acc. | shuffled prompts | gold agreement | s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.start} | {p.parameters:,} | {p.labels} | {p.score} | {p.pairs} | {p.epochs} | {p.lr:g} | "
            f"{'–' if p.head_lr is None else f'{p.head_lr:g}'} | {p.seed} | {p.steps} | {p.train_accuracy:.3f} | "
            f"{p.heldout} | {p.accuracy:.3f} | {p.accuracy_shuffled:.3f} | {p.gold_agreement:.3f} | {p.seconds:.0f} |"
        )
    if baselines:
        lines += [
            "",
            "Linear Bradley–Terry judges on the same labels (logistic regression on the difference of the two",
            "answers' features; the gold features depend on the prompt):",
            "",
            "| features | train acc. | held-out acc. |",
            "|---|---:|---:|",
            *(f"| {name} | {tr:.3f} | {va:.3f} |" for name, (tr, va) in baselines.items()),
        ]
    (out / "rm_curve.md").write_text("\n".join(lines) + "\n")
    write_figure(points, out)


def write_figure(points: list[Point], out: Path) -> Path:
    """`rm_curve.png`: held-out accuracy and gold agreement against training pairs (`plots.rm_curve_figure`)."""
    import pandas as pd

    from salsa.analysis.plots import rm_curve_figure, save_png

    return save_png(rm_curve_figure(pd.DataFrame([asdict(p) for p in points])), out / "rm_curve.png", dpi=100)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", action="append", metavar="NAME=PATH",
                    help="a start checkpoint (the first one is varied along every axis); repeat for more")  # fmt: skip
    ap.add_argument("--sizes", default="750,1500,3000,6000,12000,24000", help="training pairs")
    ap.add_argument("--epochs", default="2,4", help="passes over the default number of pairs")
    ap.add_argument("--lrs", default="3e-4,3e-3", help="learning rates tried at the default number of pairs")
    ap.add_argument("--lr", type=float, default=None, help="learning rate of every point that does not vary it "
                    "(default: conf/rm/default.yaml's)")  # fmt: skip
    ap.add_argument("--seeds", default="0", help="reward-model seeds (each point is trained once per seed)")
    ap.add_argument("--task-seed", type=int, default=0)
    ap.add_argument("--labels", choices=("raters", "gold"), default="raters",
                    help="the raters' noisy labels, or noise-free ones (the higher gold reward wins)")  # fmt: skip
    ap.add_argument("--score", choices=("last", "mean"), default=None,
                    help="rm.score of every point (default: conf/rm/default.yaml's)")  # fmt: skip
    ap.add_argument("--head-lr", type=float, default=None, help="rm.head_lr of every point (default: none)")
    ap.add_argument("--heldout", choices=("val", "fresh"), default="val",
                    help="score on the task's 500 validation pairs, or on --fresh-pairs new pairs (split "
                    "'rm_fresh') that no setting was chosen on")  # fmt: skip
    ap.add_argument("--fresh-pairs", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("results/rm"))
    ap.add_argument("--append", action="store_true", help="add the points to the study already in --out")
    ap.add_argument("--replot", action="store_true", help="only draw rm_curve.png again, from --out's rm_curve.csv")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if args.replot:
        points, _ = read_points(args.out)
        if not points:
            ap.error(f"--replot: no rm_curve.csv in {args.out}")
        write_figure(points, args.out)
        return
    if not args.start:
        ap.error("--start is required (or --replot)")

    torch.set_num_threads(max(1, torch.get_num_threads()))
    defaults = OmegaConf.load(DEFAULTS)
    if args.lr is not None:
        defaults.lr = args.lr
    if args.score is not None:
        defaults.score = args.score
    if args.head_lr is not None:
        defaults.head_lr = args.head_lr
    starts = dict(s.split("=", 1) for s in args.start)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    task = SyntheticTask(args.task_seed)
    pool = task.preference_pairs(max(sizes + [3000]), "train")
    val = (
        task.preference_pairs(500, "val")
        if args.heldout == "val"
        else task.preference_pairs(args.fresh_pairs, "rm_fresh")
    )
    baselines = {name: linear_baseline(pool[:3000], val, extra) for name, extra in BASELINES.items()}  # raters'
    if args.labels == "gold":
        pool = [gold_labelled(p) for p in pool]
    points, commands = read_points(args.out) if args.append else ([], [])
    commands.append("python -m salsa.analysis.rm_curve " + shlex.join(argv))
    for seed in [int(s) for s in args.seeds.split(",")]:
        plan = grid(3000, sizes, [float(x) for x in args.lrs.split(",") if x],
                    [int(x) for x in args.epochs.split(",") if x], list(starts), int(defaults.epochs))  # fmt: skip
        for start, n, epochs, lr in plan:
            hp = OmegaConf.merge(defaults, {"epochs": epochs, **({"lr": lr} if lr else {})})
            p = train_point(
                start, Path(starts[start]), pool[:n], val, hp, int(defaults.seed) + seed, args.labels, args.heldout
            )
            print(f"{p.start:>10} score {p.score} pairs {p.pairs:>6} epochs {p.epochs} lr {p.lr:g} "
                  f"head lr {p.head_lr} seed {p.seed}: "
                  f"train {p.train_accuracy:.3f} held-out {p.accuracy:.3f} "
                  f"(shuffled prompts {p.accuracy_shuffled:.3f}) "
                  f"gold {p.gold_agreement:.3f} "
                  f"({p.seconds:.0f} s)", flush=True)  # fmt: skip
            points.append(p)
            rater_gold = statistics.fmean(p.gold_margin > 0 for p in val)
            write_report(points, label_ceiling(val), rater_gold, args.out, commands, baselines)


if __name__ == "__main__":
    main()
