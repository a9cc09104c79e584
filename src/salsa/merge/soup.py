"""Model soups: weight averages of fine-tuned ingredients that share one base.

- `soup_checkpoints`: full checkpoints averaged shard by shard, read through memory maps and written to
  safetensors, so memory holds about one shard in float32 plus one ingredient file, whatever the model's size.
- `soup_lora_adapters`: LoRA ingredients on one base. The soup is the average of their *deltas* B·A·scale, written
  exactly as one adapter of rank Σr by concatenating the A's and the weighted, scaled B's. (Averaging A and B
  separately gives a different model: the mean of products is not the product of means.)
- `greedy_soup`: add ingredients in order of a held-out score, keeping each only if the score improves.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from salsa.errors import SalsaError
from salsa.infra.progress import track

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# config.json keys that may differ between ingredients of the same architecture
_CONFIG_NOISE = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "id2label",
    "label2id",
}


class SoupError(SalsaError, ValueError):
    """Ingredients that cannot be averaged into one model."""


# ---------------------------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------------------------
def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Uniform 1/n when `weights` is None; otherwise the weights divided by their (positive) sum."""
    if n < 2:
        raise SoupError(f"a soup needs at least 2 ingredients, got {n}")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise SoupError(f"soup.weights has {len(w)} entries for {n} ingredients")
    if not all(math.isfinite(x) for x in w):
        raise SoupError(f"soup.weights must be finite, got {w}")
    total = sum(w)
    if not total > 0:
        raise SoupError(f"soup.weights must sum to a positive number, got {w} (sum {total})")
    return [x / total for x in w]


def accumulate(acc: torch.Tensor | None, t: torch.Tensor, w: float) -> torch.Tensor:
    """acc + w · t, kept in float32 (float64 for float64 input); `acc` None starts the sum. Updates `acc` in place.

    Summing ingredients one at a time this way gives Σ w_i · t_i; `t` may be a view of a memory-mapped file: the
    result never shares its memory.
    """
    if acc is None:  # w · t is exactly 0 + w · t: one pass instead of zeros then add
        return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32) * w
    return acc.add_(t.to(acc.dtype), alpha=w)


def concat_lora(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (A, B) pair, with scale 1, whose delta B @ A equals Σ w_i · scale_i · B_i @ A_i exactly."""
    a = torch.cat([a for a, _, _ in factors], dim=0)
    b = torch.cat([(w * s) * bb.float() for (_, bb, s), w in zip(factors, weights, strict=True)], dim=1)
    return a.to(factors[0][0].dtype), b.to(factors[0][1].dtype)


def greedy_soup(
    candidates: Sequence[str], score: Callable[[list[str]], float], higher_is_better: bool = False
) -> tuple[list[str], list[float]]:
    """Wortsman et al.'s greedy soup. `score(members)` evaluates the uniform soup of `members` on held-out data.

    Candidates are ranked by their own score; each is added to the soup only if that improves the score.
    Returns the chosen members and the score after each accepted step.
    """
    if len(candidates) < 2:
        raise SoupError(f"a greedy soup needs at least 2 candidates, got {len(candidates)}")
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
    single = {c: score([c]) for c in candidates}
    ranked = sorted(candidates, key=lambda c: single[c], reverse=higher_is_better)
    chosen, best = [ranked[0]], single[ranked[0]]
    history = [best]
    for c in ranked[1:]:
        s = score([*chosen, c])
        if better(s, best):
            chosen, best = [*chosen, c], s
            history.append(s)
    return chosen, history


# ---------------------------------------------------------------------------------------------------------------
# Full checkpoints
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_shards(path: str | os.PathLike) -> dict[str, list[str]]:
    """{shard file name: tensor names} of a Hugging Face safetensors checkpoint directory."""
    path = Path(path)
    index = path / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        return shards
    single = path / SAFE_SINGLE
    if not single.is_file():
        raise SoupError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX} (soups read safetensors checkpoints only)")
    try:
        with safe_open(str(single), "pt") as f:
            return {SAFE_SINGLE: list(f.keys())}
    except Exception as e:  # truncated or corrupt file
        raise SoupError(f"{single}: unreadable safetensors file ({e})") from e


def _tensor_index(path: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{tensor name: (shard, shape, dtype)} read from headers only."""
    out = {}
    for shard, names in checkpoint_shards(path).items():
        try:
            with safe_open(str(path / shard), "pt") as f:
                for n in names:
                    sl = f.get_slice(n)
                    out[n] = (shard, tuple(sl.get_shape()), sl.get_dtype())
        except SoupError:
            raise
        except Exception as e:
            raise SoupError(f"{path / shard}: unreadable safetensors file ({e})") from e
    return out


def _arch_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SoupError(f"{path}: no config.json")
    return {k: v for k, v in json.loads(cfg_file.read_text()).items() if k not in _CONFIG_NOISE}


def check_compatible(paths: Sequence[Path]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Raise SoupError unless every checkpoint has the same architecture config, tensor names and shapes."""
    ref_cfg, ref_index = _arch_config(paths[0]), _tensor_index(paths[0])
    for p in paths[1:]:
        cfg = _arch_config(p)
        if cfg != ref_cfg:
            diff = sorted(k for k in set(cfg) | set(ref_cfg) if cfg.get(k) != ref_cfg.get(k))
            raise SoupError(f"ingredients differ in architecture: {paths[0]} vs {p} (config keys {diff})")
        index = _tensor_index(p)
        if set(index) != set(ref_index):
            extra, missing = sorted(set(index) - set(ref_index)), sorted(set(ref_index) - set(index))
            raise SoupError(f"ingredients differ in tensor names: {p} has extra {extra[:5]}, lacks {missing[:5]}")
        for n, (_, shape, _) in index.items():
            if shape != ref_index[n][1]:
                raise SoupError(f"ingredients differ in shape of {n}: {ref_index[n][1]} vs {shape} ({p})")
    return ref_index


# safetensors dtype codes (the format's spec) and the torch dtypes they hold
SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def write_safetensors_streamed(
    path: str | os.PathLike,
    specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
    tensors: Iterable[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors arrive one at a time, in the order of `specs` (name, shape, dtype).

    The header is laid out from the shapes first; each tensor is then written as it is made and can be freed, so
    the file's contents are never all in memory together.
    """
    codes = {dtype: code for code, dtype in SAFE_DTYPES.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as the reference writer lays it out
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, shape, dtype), t in zip(specs, tensors, strict=True):
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: expected {tuple(shape)} {dtype}, got {tuple(t.shape)} {t.dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def soup_checkpoints(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike, weights: Sequence[float] | None = None
) -> list[float]:
    """Write the weighted average of Hugging Face safetensors checkpoints to `out`, keeping the first's sharding.

    Shard by shard: the output shard's tensors are summed in float32 one ingredient at a time, each ingredient's
    file read through a memory map (the page cache's own pages, no copy) that is closed before the next file is
    opened. Memory holds one output shard in float32 plus the pages of one ingredient file, whatever the model's
    size, and the files are read as fast as loading them whole. Non-floating tensors (integer buffers) must be equal
    across ingredients and are copied.
    """
    paths = [Path(p) for p in paths]
    w = normalize_weights(weights, len(paths))
    check_compatible(paths)
    indexes = [_tensor_index(p) for p in paths]  # each ingredient's own shard of each tensor
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def summed(names: Sequence[str]) -> dict[str, torch.Tensor]:
        acc: dict[str, torch.Tensor] = {}
        for i, path in enumerate(paths):
            files: dict[str, list[str]] = {}  # this ingredient's files holding the shard's tensors
            for n in names:
                files.setdefault(indexes[i][n][0], []).append(n)
            for file, members in files.items():
                with safe_open(str(path / file), "pt") as f:
                    for n in members:
                        t = f.get_tensor(n)
                        if t.dtype.is_floating_point:
                            acc[n] = accumulate(acc.get(n), t, w[i])
                        elif n not in acc:
                            acc[n] = t.clone()  # the map closes with the file
                        elif not torch.equal(t, acc[n]):
                            raise SoupError(f"non-floating tensor {n} differs between ingredients")
        return acc

    shards = checkpoint_shards(paths[0])
    for shard, names in track(shards.items(), "[soup] averaging shards", total=len(shards)):
        specs = [(n, indexes[0][n][1], SAFE_DTYPES[indexes[0][n][2]]) for n in names]
        acc = summed(names)
        tensors = (acc.pop(n).to(dtype) for n, _, dtype in specs)  # each freed once written
        write_safetensors_streamed(out / shard, specs, tensors, {"format": "pt"})
    for f in paths[0].iterdir():  # config, generation config, tokenizer files, shard index
        if f.is_file() and not f.name.endswith(".safetensors") and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return w


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters
# ---------------------------------------------------------------------------------------------------------------
def _adapter_scale(cfg: dict, rank: int) -> float:
    alpha = cfg.get("lora_alpha", rank)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def soup_lora_adapters(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
) -> list[float]:
    """Write one peft LoRA adapter whose delta is the weighted average of the ingredients' deltas, exactly.

    With `normalize=False` the weights are used as given (e.g. all 1: the exact sum of stacked adapters).
    """
    paths = [Path(p) for p in paths]
    w = normalize_weights(weights, len(paths)) if normalize else [float(x) for x in weights]
    cfgs = []
    for p in paths:
        if not (p / ADAPTER_CONFIG).is_file() or not (p / ADAPTER_WEIGHTS).is_file():
            raise SoupError(f"{p}: not a peft adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected)")
        cfg = json.loads((p / ADAPTER_CONFIG).read_text())
        if cfg.get("peft_type") != "LORA":
            raise SoupError(f"{p}: peft_type {cfg.get('peft_type')!r}, only LORA adapters can be souped")
        for unsupported in ("use_dora", "modules_to_save"):
            if cfg.get(unsupported):
                raise SoupError(f"{p}: {unsupported} is set; soups of such adapters are not supported")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise SoupError(f"{p}: per-module rank_pattern/alpha_pattern is not supported in soups")
        cfgs.append(cfg)
    base = {c.get("base_model_name_or_path") for c in cfgs}
    if len(base) != 1:
        raise SoupError(f"LoRA ingredients are on different bases: {sorted(map(str, base))}")

    tensors = []
    for p in paths:
        try:
            tensors.append(load_file(str(p / ADAPTER_WEIGHTS)))
        except Exception as e:
            raise SoupError(f"{p / ADAPTER_WEIGHTS}: unreadable safetensors file ({e})") from e
    names = set(tensors[0])
    for p, t in zip(paths[1:], tensors[1:], strict=True):
        if set(t) != names:
            raise SoupError(f"LoRA ingredients adapt different modules: {paths[0]} vs {p}")
    unknown = [n for n in names if not (n.endswith("lora_A.weight") or n.endswith("lora_B.weight"))]
    if unknown:
        raise SoupError(f"adapter tensors other than lora_A/lora_B are not supported in soups: {unknown[:3]}")

    result: dict[str, torch.Tensor] = {}
    for a_name in sorted(n for n in names if n.endswith("lora_A.weight")):
        b_name = a_name[: -len("lora_A.weight")] + "lora_B.weight"
        factors = []
        for cfg, t in zip(cfgs, tensors, strict=True):
            a, b = t[a_name], t[b_name]
            factors.append((a, b, _adapter_scale(cfg, a.shape[0])))
        result[a_name], result[b_name] = concat_lora(factors, w)
    total_rank = sum(t[a_name].shape[0] for t in tensors)  # every module gets rank Σ r_i

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(result, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = dict(cfgs[0])
    # same tensor names => same adapted modules, so the first ingredient's target_modules stand for all
    cfg.update(r=total_rank, lora_alpha=total_rank, use_rslora=False, lora_dropout=0.0, inference_mode=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    for f in paths[0].iterdir():  # tokenizer files, so the soup directory loads like its ingredients
        if f.is_file() and not f.name.endswith(".safetensors") and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return w


# ---------------------------------------------------------------------------------------------------------------
# Command line: python -m salsa.merge.soup --out DIR [--weights W ...] INGREDIENT INGREDIENT [...]
# ---------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    """Average Hugging Face checkpoints (or peft LoRA adapters on one base) into a new directory."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m salsa.merge.soup", description=main.__doc__)
    parser.add_argument("ingredients", nargs="+", help="checkpoint or adapter directories of the same architecture")
    parser.add_argument("--out", required=True, help="new directory for the soup")
    parser.add_argument("--weights", type=float, nargs="+", help="one weight per ingredient (normalised); default 1/N")
    args = parser.parse_args(argv)
    paths, out = [Path(p) for p in args.ingredients], Path(args.out)
    try:
        if out.exists() and any(out.iterdir()):
            raise SoupError(f"--out {out} exists and is not empty; choose a new directory")
        lora = all((p / ADAPTER_CONFIG).is_file() for p in paths)
        weights = (soup_lora_adapters if lora else soup_checkpoints)(paths, out, args.weights)
    except SoupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    kind = "LoRA adapter" if lora else "checkpoint"
    print(f"wrote the {kind} soup of {len(paths)} ingredients (weights {[round(w, 4) for w in weights]}) to {out}")


if __name__ == "__main__":
    main()
