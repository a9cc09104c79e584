"""The paper's reward landscape: mean reward over the plane through three SFT ingredients.

    θ(a, b) = θ0 + a(θ1 − θ0) + b(θ2 − θ0)

puts the ingredients at (0, 0), (1, 0), (0, 1) and their uniform soup at (1/3, 1/3). Every grid point's model answers
the same held-out prompts with the same sampling seed (as in evaluation, so differences between points are not
sampling noise); the reward model and, on the embedded task, the gold reward score the answers. SALSA's premise is
that the soup sits in a higher-reward region of this plane than the ingredients.

The landscape is a cached stage like the others: ingredients, soup and reward model come from the stage cache
(trained once, shared with `src/train.py` runs), and the grid itself is cached by its settings.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from salsa.analysis.plots import landscape_figure, save_png
from salsa.config import LandscapeConfig
from salsa.data.task import judge_answers
from salsa.errors import ConfigError
from salsa.infra import progress
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log, plain
from salsa.infra.tracking import Tracker
from salsa.models.hf import load_causal_lm, load_reward_model, load_tokenizer
from salsa.runner import output_dir, prepare
from salsa.stages.base import run_base
from salsa.stages.evaluate import answer
from salsa.stages.rm import run_rm
from salsa.stages.sft import run_sft
from salsa.stages.soup import run_soup

Params = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Plane math (pure)
# ---------------------------------------------------------------------------------------------------------------
def grid_axis(lo: float, hi: float, steps: int) -> list[float]:
    """`steps` evenly spaced values from `lo` to `hi`, both included."""
    if steps < 2:
        raise ValueError(f"a grid axis needs at least 2 steps, got {steps}")
    return [lo + (hi - lo) * i / (steps - 1) for i in range(steps)]


def plane_point(t0: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """θ0 + a(θ1 − θ0) + b(θ2 − θ0) for one tensor, computed in float32 and returned in θ0's dtype."""
    t0f = t0.float()
    return (t0f + a * (t1.float() - t0f) + b * (t2.float() - t0f)).to(t0.dtype)


def plane_coords(theta: Params, t0: Params, t1: Params, t2: Params) -> tuple[float, float]:
    """(a, b) of the point of the plane closest to θ (least squares over all tensors of `t0`).

    With u = θ1 − θ0, v = θ2 − θ0, d = θ − θ0, the normal equations are

        [u·u  u·v] [a]   [u·d]
        [u·v  v·v] [b] = [v·d].
    """
    uu = uv = vv = ud = vd = 0.0
    for name, x0 in t0.items():
        x0 = x0.double()
        u, v, d = t1[name].double() - x0, t2[name].double() - x0, theta[name].double() - x0
        uu, uv, vv = uu + float((u * u).sum()), uv + float((u * v).sum()), vv + float((v * v).sum())
        ud, vd = ud + float((u * d).sum()), vd + float((v * d).sum())
    det = uu * vv - uv * uv
    if det <= 1e-12 * max(uu * vv, 1e-300):
        raise ValueError("the three points do not span a plane (θ1 − θ0 and θ2 − θ0 are parallel or zero)")
    return (ud * vv - vd * uv) / det, (vd * uu - ud * uv) / det


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a model's parameters (tied weights appear once, as in `named_parameters`)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def load_plane_point(model: torch.nn.Module, t0: Params, t1: Params, t2: Params, a: float, b: float) -> None:
    """Set `model`'s parameters to θ(a, b) in place."""
    for name, p in model.named_parameters():
        p.copy_(plane_point(t0[name], t1[name], t2[name], a, b))


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------
def check_landscape(cfg: DictConfig) -> None:
    """Raise ConfigError for a `landscape` node the grid cannot be built from (before anything loads)."""
    LandscapeConfig.from_cfg(cfg.landscape).check("landscape")


def mean_rewards(model, tok, reward_model, prompts: list[str], e, judge, name: str) -> dict[str, float]:
    """Mean RM (and gold) reward of `model`'s answers, with evaluation's sampling settings and seed."""
    out = answer(model, tok, prompts, e, reward_model, name=name)
    rewards = {"rm_reward": float(np.mean(out["rm"]))}
    if judge is not None:
        rewards["gold_reward"] = float(np.mean(judge_answers(judge, prompts, out["texts"], out["ended"])))
    return rewards


def run_landscape(ctx: Context) -> Entry:
    """The cached landscape of `cfg.landscape.ingredients` and their soup (`cfg.soup`), scored by the RM."""
    cfg = ctx.cfg
    lc = LandscapeConfig.from_cfg(cfg.landscape)
    base = run_base(ctx)
    sft = {i: run_sft(ctx, base, i) for i in lc.ingredients}
    soup = run_soup(ctx, [sft[i] for i in lc.ingredients])
    rm = run_rm(ctx, base)
    if any(e.manifest.get("format") != "full" for e in (*sft.values(), soup)):
        raise ConfigError("model", "the landscape interpolates full checkpoints; these ingredients are adapters")
    spec = {
        "ingredients": [sft[i].key for i in lc.ingredients], "soup": soup.key, "rm": rm.key,
        "landscape": plain(cfg.landscape), "eval": plain(cfg.eval), "data": plain(cfg.data),
    }  # fmt: skip

    def build(work: Path, run_id: str | None) -> dict:
        data, e = ctx.data, cfg.eval
        prompts = [p for p in data.prompts_eval[: lc.n_prompts] for _ in range(e.samples_per_prompt)]
        tok = load_tokenizer(sft[lc.ingredients[0]].path)
        reward_model = load_reward_model(rm.path).eval()
        ingredients = [load_causal_lm(sft[i].path).eval() for i in lc.ingredients]
        soup_model = load_causal_lm(soup.path).eval()
        t0, t1, t2 = (parameters(m) for m in ingredients)
        marks = {f"sft {i}": xy for i, xy in zip(lc.ingredients, [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)], strict=True)}
        marks["soup"] = plane_coords(parameters(soup_model), t0, t1, t2)  # (1/3, 1/3) for the uniform soup

        # the marked models themselves, scored exactly (the grid need not pass through them; a greedy or weighted
        # soup may even lie off the plane)
        points = {
            label: mean_rewards(m, tok, reward_model, prompts, e, data.judge, label)
            for label, m in zip(marks, [*ingredients, soup_model], strict=True)
        }
        model = ingredients[0]  # its weights are overwritten with each grid point's

        a_axis = grid_axis(lc.a_min, lc.a_max, lc.steps)
        b_axis = grid_axis(lc.b_min, lc.b_max, lc.steps)
        grids = {k: np.full((len(b_axis), len(a_axis)), np.nan) for k in points["soup"]}
        cells = list(itertools.product(enumerate(b_axis), enumerate(a_axis)))
        for (j, b), (i, a) in progress.track(cells, "[landscape] scoring the grid"):
            load_plane_point(model, t0, t1, t2, a, b)
            for k, v in mean_rewards(model, tok, reward_model, prompts, e, data.judge, f"a={a:.2f} b={b:.2f}").items():
                grids[k][j, i] = v

        result = {
            "a": a_axis, "b": b_axis, "grids": {k: g.tolist() for k, g in grids.items()},
            "marks": {k: list(v) for k, v in marks.items()}, "points": points, "prompts": len(prompts),
        }  # fmt: skip
        (work / "landscape.json").write_text(json.dumps(result, indent=2))
        save_png(landscape_figure(a_axis, b_axis, grids, marks), work / "landscape.png")
        metrics = {f"{label.replace(' ', '')}/{k}": v for label, r in points.items() for k, v in r.items()}
        log.info("[landscape] rewards at the marked points: %s", points)
        return {"metrics": metrics, "ingredients": lc.ingredients, "soup_coords": list(marks["soup"])}

    return ctx.build("landscape", spec, build)


def landscape_job(cfg: DictConfig) -> dict[str, Any]:
    """What `src/landscape.py` does: build (or reuse) the landscape, copy it to the run dir, log it to MLflow."""
    check_landscape(cfg)
    prepare(cfg)
    out = output_dir(cfg)
    tracker = Tracker.from_cfg(cfg)
    with tracker.run(f"{cfg.task_name}-landscape", cfg, {"kind": "landscape", "output_dir": str(out)}) as run_id:
        entry = run_landscape(Context.from_cfg(cfg, tracker))
        for name in ("landscape.png", "landscape.json"):
            shutil.copy2(entry.path / name, out / name)
            tracker.log_artifact(run_id, out / name)
        tracker.log_metrics(run_id, {f"landscape/{k}": v for k, v in entry.manifest["metrics"].items()})
    log.info("landscape written to %s", out / "landscape.png")
    return json.loads((out / "landscape.json").read_text())
