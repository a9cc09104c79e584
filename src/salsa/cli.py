"""What `src/train.py` does around Hydra: one-line errors for things a user can fix, before anything heavy loads."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from salsa.errors import ConfigError, SalsaError

if TYPE_CHECKING:
    from importlib.abc import Traversable  # a directory on disk (Path) or inside an installed package (pkg://)


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


def searchpath_entries(argv: Sequence[str], conf_dir: Path, config_name: str = "train") -> list[str]:
    """`hydra.searchpath` as Hydra reads it: the first `hydra.searchpath=[...]` on the command line replaces the one
    in the primary config file (`conf/<config_name>.yaml`). Unreadable values give none: Hydra reports them itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for arg in argv:
        if arg.startswith("hydra.searchpath="):  # only this exact key: Hydra ignores `+hydra.searchpath=`
            try:
                value = OverridesParser.create().parse_override(arg).value()
            except Exception:
                return []
            return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
    try:
        found = OmegaConf.select(OmegaConf.load(conf_dir / f"{config_name}.yaml"), "hydra.searchpath")
        return [str(v) for v in found] if OmegaConf.is_list(found) else []
    except Exception:  # a missing primary config or an interpolation only Hydra can resolve
        return []


def config_dir(entry: str) -> Traversable | None:
    """A search path entry as a directory, the way Hydra opens it: `file://<dir>` (or a bare path), relative to the
    current directory, and `pkg://<package>` (dots or slashes). None for what holds no files to list, or is absent."""
    scheme, sep, rest = entry.partition("://")
    if not sep:
        scheme, rest = "file", entry
    if scheme == "file":
        path = Path(rest).absolute()
        return path if path.is_dir() else None
    if scheme != "pkg":
        return None  # structured:// (dataclasses) or a plugin's own scheme
    from importlib import resources

    try:
        found = resources.files(rest.replace("/", ".").rstrip("."))
    except (ImportError, TypeError, ValueError):
        return None
    return found if found.is_dir() else None


def search_dirs(argv: Sequence[str], conf_dir: Path, config_name: str = "train") -> list[Traversable]:
    """Every directory Hydra searches for configs, in its order: the repository's conf/, then each `hydra.searchpath`
    entry. Researchers keep their own experiments in these, so an option or a file may come from any of them."""
    found = (config_dir(entry) for entry in searchpath_entries(argv, conf_dir, config_name))
    return [conf_dir, *(d for d in found if d is not None)]


def group_options(dirs: Sequence[Traversable], group: str) -> list[str] | None:
    """The options of config group `group` in all of `dirs`, sorted; None when no dir has the group."""
    groups = [d / group for d in dirs if (d / group).is_dir()]
    if not groups:
        return None
    return sorted({f.name.removesuffix(".yaml") for g in groups for f in g.iterdir() if f.name.endswith(".yaml")})


def unknown_group_option(argv: Sequence[str], dirs: Sequence[Traversable]) -> str | None:
    """The first `group=option` override naming an option that no search dir has (`<dir>/<group>/<option>.yaml`),
    as a message listing the options of all of them. `dirs`: `search_dirs(...)`."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if "." in key or "/" in key or "(" in value:
            continue  # a value override, a plugin group (hydra/launcher=...), or a sweep function
        options = group_options(dirs, key)
        if options is None:
            continue  # not a config group
        for choice in value.split(","):
            found = any((d / key / f"{choice}.yaml").is_file() for d in dirs)  # also nested: experiment=mine/a
            if not found and choice != "null":
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


def shown_file(name: str, dirs: Sequence[Traversable]) -> str:
    """Config `name` (e.g. experiment/mine) as a file a user can open: relative in the repository's conf/ (the first
    of `dirs`), else the full path in the search dir Hydra took it from (the first that has it)."""
    for i, d in enumerate(dirs):
        if (d / f"{name}.yaml").is_file():
            return f"{name}.yaml" if i == 0 else str(d / f"{name}.yaml")
    return f"{name}.yaml"


def one_line(error: BaseException, dirs: Sequence[Traversable] = ()) -> str:
    """A composition error as `key: what is wrong (where)`, from the chain Hydra and OmegaConf raise; `where` is
    looked up in the search dirs `dirs`."""
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
    return message + (f" (in {shown_file(where, dirs)})" if where else "")


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
        if key.lstrip("+~").startswith("hydra") and key != "hydra.searchpath":  # the search path finds the files
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
        return one_line(e, search_dirs(argv, conf_dir, config_name))
    finally:
        GlobalHydra.instance().clear()
    return None


def check_argv(argv: Sequence[str], conf_dir: Path, config_name: str = "train") -> None:
    """One-line errors for a command line that cannot run, before Hydra starts (whose own errors span lines)."""
    message = (
        unknown_group_option(argv, search_dirs(argv, conf_dir, config_name))
        or missing_sweeper(argv)
        or composition_error(argv, conf_dir, config_name)
    )
    absent = [e for e in searchpath_entries(argv, conf_dir, config_name) if config_dir(e) is None]
    if message and absent:  # Hydra only warns about these; a misspelled one is the likely cause
        message += f" (hydra.searchpath: no directory {', '.join(absent)})"
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
