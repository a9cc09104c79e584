"""What `src/train.py` does around Hydra: one-line errors for things a user can fix, before anything heavy loads."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from salsa.errors import ConfigError, SalsaError


def unique_dir(path: str) -> str:
    """`path`, or `path_2`, `path_3`, ...: the first that this call creates.

    Run directories are named by the second a run started, so runs started together (a shell loop, a scheduler's
    job array, two sweeps) would share one and overwrite each other's results and logs. `mkdir` is atomic, also
    on network file systems, so each process gets a directory no other process has.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = target if n == 1 else target.with_name(f"{target.name}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return str(candidate)
    raise ConfigError(f"{target}: 10,000 run directories of this name already exist")


def register_resolvers() -> None:
    """Resolvers the config uses (conf/hydra/default.yaml). Cached per config: a run resolves its directory once,
    and every job of a sweep, in whichever process, sees the directory its launcher created."""
    if not OmegaConf.has_resolver("salsa.unique_dir"):
        OmegaConf.register_new_resolver("salsa.unique_dir", unique_dir, use_cache=True)


def unknown_group_option(argv: Sequence[str], conf_dir: Path) -> str | None:
    """The first `group=option` override naming an option that has no `conf/<group>/<option>.yaml`, as a message."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        group = conf_dir / key
        if "." in key or "/" in key or not group.is_dir() or "(" in value:
            continue  # a value override, a plugin group (hydra/launcher=...), or a sweep function
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options and choice != "null":
                return f"{key}={choice} is not an option; {key} is one of: {', '.join(options)}"
    return None


def wants_traceback(cfg: DictConfig | None = None) -> bool:
    flag = os.environ.get("SALSA_TRACEBACK", "").lower() in ("1", "true", "yes")
    return flag or bool(cfg is not None and cfg.get("extras") and cfg.extras.get("traceback"))


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def missing_sweeper(argv: Sequence[str]) -> str | None:
    """A message when the command line asks for the Optuna sweeper and its optional extra is not installed."""
    if not any(a.startswith(("hparams_search=", "hydra/sweeper=optuna")) and not a.endswith("=null") for a in argv):
        return None
    import importlib.util

    try:
        found = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        found = False
    if not found:
        return 'hyperparameter searches need the Optuna sweeper: pip install -e ".[optuna]"'
    return None


def check_argv(argv: Sequence[str], conf_dir: Path) -> None:
    message = unknown_group_option(argv, conf_dir) or missing_sweeper(argv)
    if message:
        fail(message)


def run(cfg: DictConfig, job: Callable[[DictConfig], Any] | None = None) -> Any:
    """Validate, then run `job` (default: the pipeline); a SalsaError becomes one line on stderr and a non-zero exit."""
    try:
        from salsa.validate import validate

        validate(cfg)
        if job is None:
            from salsa.runner import train as job

        return job(cfg)
    except SalsaError as e:
        if wants_traceback(cfg):
            raise
        fail(str(e), 2 if isinstance(e, ConfigError) else 1)
    return None


register_resolvers()  # at import: the entry points, and sweep jobs in worker processes (joblib), all import this module
