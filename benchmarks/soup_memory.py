"""Soup memory: wall time and peak RSS of averaging 3 checkpoints of a ~200M-parameter model, three ways.

- ours: `salsa.merge.soup.soup_checkpoints` (shard by shard through memory maps, written streamed);
- naive: load every ingredient's full state dict, average, save;
- mergekit: its `linear` merge through `mergekit-yaml`, installed on first use into `benchmarks/.venvs/mergekit`.

The checkpoints are random Gemma-architecture models saved with save_pretrained in a temp dir, sharded at
`--shard-size`. Each method runs in its own process (its peak RSS is its own) after the ingredients' files have
been read once, so every method starts from the same warm page cache; each runs `--repeats` times, alternating
the order, and keeps its fastest wall and CPU time and its largest peak. `baseline` is a process that only imports
torch and safetensors: the floor under every method's number.

    python benchmarks/soup_memory.py              # ~200M parameters, ours / naive / mergekit
    python benchmarks/soup_memory.py --smoke      # seconds; mergekit only if its venv exists
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import VENVS, ensure_venv, human_bytes, run_measured  # noqa: E402

MERGEKIT_PACKAGES = ["mergekit"]
# ~201M parameters: 11 Gemma layers of width 1024 (GQA 16:4 heads) and a 32k vocabulary
ARCH = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 11,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
SMOKE_ARCH = {**ARCH, "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}  # fmt: skip


def make_ingredients(root: Path, arch: dict, n: int, shard_size: str) -> tuple[list[Path], int]:
    from transformers import GemmaConfig, GemmaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = GemmaForCausalLM(GemmaConfig(**arch))
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(root / f"ingredient{i}", max_shard_size=shard_size)
        paths.append(root / f"ingredient{i}")
        del model
    return paths, params


# ---------------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process
# ---------------------------------------------------------------------------------------------------------------
def worker(method: str, paths: list[Path], out: Path) -> None:
    if method == "baseline":
        import safetensors.torch  # noqa: F401  (the imports every method pays for)
    elif method == "ours":
        from salsa.merge.soup import soup_checkpoints

        soup_checkpoints(paths, out)
    elif method == "naive":
        naive_soup(paths, out)
    else:
        raise ValueError(method)


def naive_soup(paths: list[Path], out: Path) -> None:
    """Load all, average, save (keeping the first ingredient's sharding)."""
    from safetensors.torch import load_file, save_file

    from salsa.merge.soup import checkpoint_shards

    states = []
    for p in paths:
        state = {}
        for shard in checkpoint_shards(p):
            state.update(load_file(p / shard))
        states.append(state)
    mean = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    out.mkdir(parents=True, exist_ok=True)
    for shard, names in checkpoint_shards(paths[0]).items():
        save_file({k: mean[k].contiguous() for k in names}, str(out / shard), metadata={"format": "pt"})
    for f in paths[0].iterdir():
        if f.suffix == ".json":
            (out / f.name).write_bytes(f.read_bytes())


def mergekit_config(paths: list[Path]) -> str:
    models = "\n".join(f"  - model: {p}\n    parameters:\n      weight: 1.0" for p in paths)
    return f"merge_method: linear\ndtype: float32\nmodels:\n{models}\n"


# ---------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------
def max_abs_difference(a: Path, b: Path, names: list[str]) -> float:
    """Largest |a - b| over a few tensors of two soups: every method must make the same model."""
    from safetensors import safe_open

    def index(path: Path) -> dict[str, Path]:
        where = {}
        for f in path.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                where.update(dict.fromkeys(h.keys(), f))
        return where

    ia, ib = index(a), index(b)
    worst = 0.0
    for n in names:
        with safe_open(str(ia[n]), "pt") as ha, safe_open(str(ib[n]), "pt") as hb:
            worst = max(worst, (ha.get_tensor(n).double() - hb.get_tensor(n).double()).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-size", default="200MB", help="save_pretrained max_shard_size of the ingredients")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method, alternating order; fastest kept")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a tiny model; mergekit only if its venv exists")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.paths, args.out)
    if args.smoke:
        args.repeats = 1

    mergekit = None
    if not args.no_mergekit:
        if args.smoke:
            installed = (VENVS / "mergekit" / ".installed").exists()
            mergekit = VENVS / "mergekit" / "bin" / "mergekit-yaml" if installed else None
            if mergekit is None:
                print("[smoke] no mergekit venv yet: ours and naive only (a full run makes it)")
        else:
            python, why = ensure_venv("mergekit", MERGEKIT_PACKAGES)
            mergekit = python.with_name("mergekit-yaml") if python else None
            if mergekit is None:
                print(f"mergekit could not be installed, so it is left out:\n{why}")

    with tempfile.TemporaryDirectory(prefix="soup-bench-") as tmp:
        root = Path(tmp)
        paths, params = make_ingredients(root, SMOKE_ARCH if args.smoke else ARCH, 3, args.shard_size)
        files = sorted(paths[0].glob("*.safetensors"))
        model_bytes = sum(f.stat().st_size for f in files)
        shard_bytes = max(f.stat().st_size for f in files)
        for p in paths:  # warm the page cache once, so no method pays the first read alone
            for f in p.iterdir():
                f.read_bytes()

        env = dict(os.environ, PYTHONWARNINGS="ignore")
        me = [sys.executable, str(Path(__file__).resolve()), "--paths", *map(str, paths)]
        commands = {m: [*me, "--worker", m, "--out", str(root / m)] for m in ("baseline", "ours", "naive")}
        if mergekit:  # run as installed: its console script
            (root / "mergekit.yml").write_text(mergekit_config(paths))
            shard_params = shard_bytes // 4  # fp32: the same output sharding as ours
            commands["mergekit"] = [
                str(mergekit), str(root / "mergekit.yml"), str(root / "mergekit"),
                "--out-shard-size", str(shard_params), "--no-copy-tokenizer", "--quiet",
            ]  # fmt: skip
        results = {m: {"seconds": float("inf"), "cpu_seconds": float("inf"), "peak_rss_bytes": 0} for m in commands}
        for r in range(args.repeats):
            for method in list(commands) if r % 2 == 0 else reversed(commands):  # alternate who goes first
                shutil.rmtree(root / method, ignore_errors=True)  # every run writes a fresh soup
                done = run_measured(commands[method], env=env)
                if done.returncode:
                    raise RuntimeError(f"{method} failed (exit {done.returncode}):\n{done.output[-4000:]}")
                best = results[method]  # fastest run, largest peak
                best["seconds"] = min(best["seconds"], done.wall_s)
                best["cpu_seconds"] = min(best["cpu_seconds"], done.cpu_s)
                best["peak_rss_bytes"] = max(best["peak_rss_bytes"], done.peak_rss_bytes)
                print(f"[soup] {method} done in {done.wall_s:.1f} s ({done.cpu_s:.1f} s CPU)", flush=True)
        names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
        for method in results:
            if method != "baseline":
                results[method]["max_abs_diff_vs_ours"] = max_abs_difference(root / "ours", root / method, names)

    goal = model_bytes + shard_bytes
    print(
        f"\n# Soup of 3 × {params / 1e6:.1f}M-parameter checkpoints (fp32, {human_bytes(model_bytes)} each, "
        f"shards of at most {human_bytes(shard_bytes)}) — torch {torch.__version__}, {os.cpu_count()} CPUs\n"
    )
    print("| method | wall s | CPU s | peak RSS | peak RSS − baseline | ≤ one model + one shard | max |Δ| vs ours |")
    print("|---|---|---|---|---|---|---|")
    base = results["baseline"]["peak_rss_bytes"]
    for method, r in results.items():
        extra = r["peak_rss_bytes"] - base
        ok = "yes" if extra <= goal else "no"
        diff = r.get("max_abs_diff_vs_ours")
        print(
            f"| {method} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {human_bytes(r['peak_rss_bytes'])} | "
            f"{human_bytes(extra) if method != 'baseline' else '-'} | {ok if method != 'baseline' else '-'} | "
            f"{'-' if diff is None else f'{diff:.1e}'} |"
        )
    print(f"\none model + one shard = {human_bytes(goal)}, compared with each method's peak RSS above the baseline")
    if args.json:
        args.json.write_text(json.dumps({"parameters": params, "model_bytes": model_bytes, "results": results}))


if __name__ == "__main__":
    main()
