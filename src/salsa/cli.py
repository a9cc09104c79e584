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
    raise ConfigError("hydra.run.dir", f"{target}: 10,000 run directories of this name already exist")


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


# flags after which Hydra does something other than compose this config and run it
NOT_A_RUN = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--package", "-p", "--shell-completion",
             "-sc", "--version", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")  # fmt: skip


def one_line(error: BaseException) -> str:
    """A composition error as `key: what is wrong (where)`, from the chain Hydra and OmegaConf raise."""
    import difflib

    where, key, what = "", None, str(error).splitlines()[0]
    node: BaseException | None = error
    while node is not None:
        first = str(node).splitlines()[0] if str(node) else ""
        if first.startswith("In '") and "':" in first:
            where = first[len("In '") : first.index("':")]  # the config file, e.g. experiment/paper_gemma2b
        if getattr(node, "full_key", None) and key is None:
            key, what = node.full_key, first
            missing = getattr(node, "key", None)
            parent = getattr(node, "parent_node", None)
            if what.startswith("Key ") and " not in " in what and missing is not None and parent is not None:
                close = difflib.get_close_matches(str(missing), [str(k) for k in parent], n=1)
                what = f"no such key{f' (did you mean {close[0]}?)' if close else ''}"
        node = node.__cause__ or node.__context__
    message = f"{key}: {what}" if key else what
    return message + (f" (in {where}.yaml)" if where else "")


def composition_error(argv: Sequence[str], conf_dir: Path, config_name: str) -> str | None:
    """Compose the config the command line asks for (a sweep: its first job) and describe the first error in one
    line: a misspelled key or a wrong type, on the command line or in any config file (the typed config
    `salsa.config.TrainConfig` refuses both). None when it composes, or when the command is not a run."""
    if any(a.split("=", 1)[0] in NOT_A_RUN for a in argv):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = []
    for parsed in OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")]):
        key = parsed.get_key_element()
        if key.lstrip("+~").startswith("hydra"):
            continue
        if parsed.is_sweep_override():
            try:
                first = next(iter(parsed.sweep_string_iterator()))
            except Exception:  # a range or interval for a sweeper (Optuna): its jobs are composed by Hydra
                continue
            overrides.append(f"{key}={first}")
        else:
            overrides.append(parsed.input_line)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except Exception as e:
        return one_line(e)
    finally:
        GlobalHydra.instance().clear()
    return None


def check_argv(argv: Sequence[str], conf_dir: Path, config_name: str = "train") -> None:
    """One-line errors for a command line that cannot run, before Hydra starts (whose own errors span lines)."""
    message = (
        unknown_group_option(argv, conf_dir) or missing_sweeper(argv) or composition_error(argv, conf_dir, config_name)
    )
    if message:
        fail(message)


def run(cfg: DictConfig, job: Callable[[DictConfig], Any] | None = None) -> Any:
    """Validate, then run `job` (default: the pipeline); a SalsaError becomes one line on stderr and a non-zero exit."""
    try:
        from salsa.validate import validate

        validate(cfg)
        if job is None:
            from salsa.runner import pipeline_job as job

        return job(cfg)
    except SalsaError as e:
        if wants_traceback(cfg):
            raise
        fail(str(e), 2 if isinstance(e, ConfigError) else 1)
    return None


def register() -> None:
    """What Hydra must know before it composes a config: the run-directory resolver and the typed config."""
    from salsa.config import register as register_schema

    register_resolvers()
    register_schema()


register()  # at import: the entry points, and sweep jobs in worker processes (joblib), all import this module
