"""The documentation: the site builds without a warning, every command it shows runs as written (up to composing its
config), and the README stays a landing page whose test command is the one CI runs."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONF, ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
SCRIPTS = {"src/train.py": "train", "src/landscape.py": "landscape"}  # entry point -> its root config
OVERRIDE_MODULES = {"salsa.models.memory": "train"}  # modules that take src/train.py's overrides
SHELL_OPERATORS = {"&&", "||", ";", "|"}


def commands(path: Path) -> list[list[str]]:
    """Every command line of the ```bash blocks of a Markdown file, continuations joined, comments dropped."""
    out = []
    for block in BASH_BLOCK.findall(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:  # `a && b`: each command on its own
                cut = next((i for i, t in enumerate(tokens) if t in SHELL_OPERATORS), len(tokens))
                if tokens[:cut]:
                    out.append(tokens[:cut])
                tokens = tokens[cut + 1 :]
    return out


def documented() -> tuple[list[tuple[str, str, list[str]]], dict[str, set[str]]]:
    """(where, config name, overrides) of every documented run of a Hydra entry point, and the flags each documented
    `python -m salsa...` command-line module is shown with."""
    runs, flags = [], {}
    for path in [README, *PAGES]:
        where = path.relative_to(ROOT).as_posix()
        for tokens in commands(path):
            script = next(
                (
                    i
                    for i, t in enumerate(tokens)
                    if t in SCRIPTS and i and Path(tokens[i - 1]).name.startswith("python")
                ),
                None,
            )
            if script is not None:
                runs.append((where, SCRIPTS[tokens[script]], tokens[script + 1 :]))
                continue
            if len(tokens) > 2 and tokens[1] == "-m" and tokens[2].startswith("salsa."):
                module, args = tokens[2], tokens[3:]
                if module in OVERRIDE_MODULES:
                    runs.append((where, OVERRIDE_MODULES[module], args))
                else:
                    flags.setdefault(module, set()).update(a.strip("[]").split("=")[0] for a in args if "--" in a)
    unique = {(name, tuple(args)): where for where, name, args in reversed(runs)}  # each run once, where first shown
    return [(where, name, list(args)) for (name, args), where in reversed(unique.items())], flags


RUNS, MODULE_FLAGS = documented()


def test_the_pages_show_the_commands_a_researcher_types():
    shown = {" ".join(args) for _, name, args in RUNS if name == "train"}
    assert {"", "ref=sft", "debug=default", "-m experiment=replicate"} <= shown
    assert {"salsa.analysis.ablations", "salsa.analysis.replicate", "salsa.export_engine"} <= set(MODULE_FLAGS)


def first_job(argv: list[str], config_name: str):
    """The config the command's (first) job composes, as `src/train.py` composes it before running
    (`salsa.cli.composition_error`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = []
    for parsed in OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")]):
        key = parsed.get_key_element()
        if key.lstrip("+~").startswith("hydra") and key != "hydra.searchpath":
            continue  # launcher and sweeper settings: Hydra's, not the job's
        if parsed.is_sweep_override():
            try:
                overrides.append(f"{key}={next(iter(parsed.sweep_string_iterator()))}")
            except Exception:  # a range or interval for a sweeper (Optuna): its jobs are composed by Hydra
                continue
        else:
            overrides.append(parsed.input_line)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize(("where", "config_name", "argv"), RUNS, ids=[f"{w}: {' '.join(a)}" for w, _, a in RUNS])
def test_every_documented_run_composes(where, config_name, argv):
    """What `src/train.py` checks before anything runs (options, keys, types; a sweep: its first job), then each
    group's own checks. Hardware, hub access and the files a command names (`/path/...` on the pages, the reader's
    own) are not checked."""
    from salsa import cli
    from salsa.config import check_groups
    from salsa.errors import ConfigError

    dirs = cli.search_dirs(argv, CONF, config_name)
    message = cli.unknown_group_option(argv, dirs) or cli.missing_sweeper(argv)
    assert message is None, f"{where}: {' '.join(argv)}: {message}"
    try:
        cfg = first_job(argv, config_name)
    except Exception as e:  # the one line src/train.py would print
        pytest.fail(f"{where}: {' '.join(argv)}: {cli.one_line(e, dirs)}")
    try:
        check_groups(cfg)
    except ConfigError as e:
        given = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "=" in a}
        if not given.get(e.key, "").startswith("/"):  # a file on the reader's machine
            raise


@pytest.mark.parametrize("module", sorted(MODULE_FLAGS))
def test_every_documented_module_command_takes_the_flags_shown(module, monkeypatch):
    help_text = io.StringIO()
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with contextlib.redirect_stdout(help_text), warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None)
    missing = {flag for flag in MODULE_FLAGS[module] if flag not in help_text.getvalue()}
    assert not missing, f"python -m {module}: no {', '.join(sorted(missing))} in its --help"


def test_readme_is_a_landing_page_with_the_ci_test_command():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    quickstart = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    (block,) = BASH_BLOCK.findall(quickstart)[:1]
    assert block.splitlines() == ['pip install -e ".[dev]" && python src/train.py', "pytest"]
    assert "mkdocs serve" in text


def test_every_page_is_in_the_nav():
    def listed(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [p for v in node.values() for p in listed(v)]
        return [p for v in node for p in listed(v)]

    nav = set(listed(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert pages - nav == set()
    reports = {p.relative_to(ROOT).as_posix() for p in (ROOT / "results").rglob("*.md")}
    assert nav - pages - reports == set()  # the reports are added to the site by docs/hooks.py


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings_handlers.python")),
    reason='the docs tools are not installed: pip install -e ".[docs]"',
)
def test_the_site_builds_in_strict_mode(tmp_path):
    """Any warning fails: a broken link or anchor between pages, a figure that is not there, a docstring the API
    reference cannot read."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "findings/index.html", "reference/config/index.html"):
        assert (tmp_path / page).is_file()
    for figure in ("results/ablations/forest.png", "results/replication/frontier.png", "results/rm/rm_curve.png"):
        assert (tmp_path / figure).is_file()
    config_page = (tmp_path / "reference/config/index.html").read_text()
    assert "PPOConfig" in config_page and "per-token KL penalty" in config_page  # fields documented by their comments
