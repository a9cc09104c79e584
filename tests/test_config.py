"""Every option of every config group composes, and the composed config has the contracts' keys."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from salsa.cli import unique_dir
from tests.conftest import CONF, make_cfg

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in {"hydra", "paths", "extras", "scale"})
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_groups_exist():
    for group in ("model", "data", "sft", "soup", "ref", "trainer", "logger", "debug", "experiment"):
        assert (CONF / group).is_dir(), group
    assert {f.stem for f in (CONF / "ref").glob("*.yaml")} >= {"sft", "other", "soup2", "soup3"}


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_option_composes(tmp_path, group, option):
    cfg = make_cfg(tmp_path, f"{group}={option}", debug=(group != "debug"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["log_dir"] == str(tmp_path)
    assert resolved["paths"]["cache_dir"] == str(Path(tmp_path) / "cache")


def test_defaults(tmp_path):
    cfg = make_cfg(tmp_path, debug=False)
    assert cfg.model.name == "tiny" and cfg.data.name == "synthetic" and cfg.ref.name == "soup3"
    assert cfg.logger.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.stage == "eval"


def _claim(path: str) -> str:
    return unique_dir(path)


def test_run_dirs_are_unique_across_processes(tmp_path):
    """Eight processes asking for one run directory at once get eight different ones, named stem, stem_2, ..."""
    from concurrent.futures import ProcessPoolExecutor

    stem = str(tmp_path / "runs" / "2026-01-01_00-00-00")
    with ProcessPoolExecutor(4) as pool:
        got = list(pool.map(_claim, [stem] * 8))
    assert sorted(got) == sorted([stem] + [f"{stem}_{n}" for n in range(2, 9)])


def test_run_dir_is_resolved_once_per_config(tmp_path):
    """Hydra reads `hydra.run.dir` more than once; the resolver is cached, so a run never claims a second dir."""
    cfg = OmegaConf.create({"dir": f"${{salsa.unique_dir:{tmp_path}/run}}"})
    assert cfg.dir == cfg.dir == str(tmp_path / "run")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_misspelled_key_in_an_experiment_file_is_one_line(tmp_path):
    """The typed config refuses a key it does not know wherever it comes from; the message names the key and file."""
    import shutil

    from salsa.cli import composition_error

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nppo:\n  kl_cof: 0.1\n")
    message = composition_error(["experiment=typo"], conf, "train")
    assert message == "ppo.kl_cof: no such key (did you mean kl_coef?) (in experiment/typo.yaml)"
    assert composition_error(["experiment=example", "ppo.kl_coef=0.1,0.2", "-m"], conf, "train") is None
    assert composition_error(["rm.lr=fast"], conf, "train").startswith("rm.lr: ")


def test_each_group_has_a_typed_config_and_checks(tmp_path):
    """Every YAML group merges into its dataclass, so `from_cfg` of each composed group gives that dataclass."""
    from salsa import config

    cfg = make_cfg(tmp_path, debug=False)
    for group in config.CHECKED_GROUPS:
        typed = config.typed(cfg[group], type(getattr(config.TrainConfig(), group)))
        typed.check(group)  # the defaults pass their own checks
    with pytest.raises(config.ConfigError, match="^ppo.num_minibatches: must divide"):
        config.PPOConfig(batch_size=10, num_minibatches=3).check("ppo")
    with pytest.raises(config.ConfigError, match="^ref.soup: "):
        config.RefConfig(name="x", soup=False, ingredients=[0, 1]).check("ref")


@pytest.mark.parametrize(("preset", "batch"), [("gemma2b", 8), ("llama2_7b", 16), ("mistral7b", 16)])
def test_hub_presets_bring_their_scale(tmp_path, preset, batch):
    """`model=<hub preset>` alone is a run at that model's scale, not the tiny model's settings; the command line
    still overrides it."""
    from salsa.config import scale_warnings

    cfg = make_cfg(tmp_path, f"model={preset}", debug=False)
    assert cfg.ppo.response_length == cfg.ppo.max_prompt_length == cfg.sft.max_response_length == 256
    assert cfg.sft.lr == 2e-4 and cfg.rm.lr == 5e-5 and cfg.ppo.lr == 1e-5 and cfg.ppo.batch_size == batch
    assert scale_warnings(cfg) == []
    assert make_cfg(tmp_path, f"model={preset}", "ppo.lr=3e-6", debug=False).ppo.lr == 3e-6
    paper = make_cfg(tmp_path, f"experiment=paper_{preset}", debug=False)
    assert paper.ppo == cfg.ppo and paper.data.name == "ultrafeedback" and paper.ref.name == "soup2"


def test_settings_that_make_no_sense_are_refused_or_warned(tmp_path):
    from salsa.config import check_groups, scale_warnings
    from salsa.errors import ConfigError

    # a checkpoint under model=tiny keeps the tiny model's settings: said, with the fix
    cfg = make_cfg(tmp_path, "model.name_or_path=/ckpt", debug=False)
    (tiny_settings, lengths) = scale_warnings(cfg)
    assert "model=gemma2b model.name_or_path=/ckpt" in tiny_settings and "ppo.response_length=40" in lengths
    # the tiny model cannot pretrain on a hub dataset that gives it no documents
    with pytest.raises(ConfigError, match="^model: model=tiny is pretrained on the task's documents"):
        check_groups(make_cfg(tmp_path, "data=ultrafeedback", debug=False))


def _experiments(conf: Path, **files: str) -> Path:
    """A config directory outside the repository holding `experiment/<name>.yaml` for each of `files`."""
    (conf / "experiment").mkdir(parents=True)
    for name, body in files.items():
        (conf / "experiment" / f"{name}.yaml").write_text(f"# @package _global_\n{body}")
    return conf


def test_experiments_in_a_hydra_searchpath_dir_are_options(tmp_path):
    """An experiment kept outside the repository (`hydra.searchpath`) composes; a misspelled key in it is one line
    naming the key and the file; an unknown option is refused with the options of every search dir."""
    from salsa.cli import composition_error, search_dirs, unknown_group_option

    ext = _experiments(tmp_path / "mine" / "conf", mine="ppo:\n  kl_coef: 0.07\n", typo="ppo:\n  kl_cof: 0.07\n")
    searchpath = f"hydra.searchpath=[file://{ext}]"
    argv = ["experiment=mine", searchpath]
    assert search_dirs(argv, CONF) == [CONF, ext]
    assert unknown_group_option(argv, search_dirs(argv, CONF)) is None
    assert composition_error(argv, CONF, "train") is None
    typo = composition_error(["experiment=typo", searchpath], CONF, "train")
    assert typo == f"ppo.kl_cof: no such key (did you mean kl_coef?) (in {ext}/experiment/typo.yaml)"
    unknown = ["experiment=nope", searchpath]
    message = unknown_group_option(unknown, search_dirs(unknown, CONF))
    assert message == (
        "experiment=nope is not an option; experiment is one of: ablations, algorithms, example, mine, paper_gemma2b, "
        "paper_llama2_7b, paper_mistral7b, replicate, smol_ifeval, typo"
    )
    assert unknown_group_option(["experiment=mine"], [CONF]).startswith("experiment=mine is not an option")  # no path


def test_search_dirs_are_found_as_hydra_finds_them(tmp_path, monkeypatch):
    """`file://` paths relative to the current directory, bare paths, `pkg://` packages (dots or slashes), and the
    primary config's `hydra.searchpath`, which one on the command line replaces. Missing dirs are left out."""
    from salsa.cli import search_dirs

    ext = _experiments(tmp_path / "conf", mine="seed: 1\n")
    package = tmp_path / "site" / "salsa_test_configs"
    _experiments(package / "conf", theirs="seed: 2\n")
    for init in (package / "__init__.py", package / "conf" / "__init__.py"):
        init.write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path)
    got = search_dirs(["hydra.searchpath=[file://conf,conf,file://missing,pkg://salsa_test_configs/conf]"], CONF)
    assert [Path(str(d)).resolve() for d in got] == [CONF, ext.resolve(), ext.resolve(), package.resolve() / "conf"]
    main = tmp_path / "main"
    main.mkdir()
    (main / "train.yaml").write_text(f"hydra:\n  searchpath:\n    - file://{ext}\n")
    assert search_dirs(["experiment=mine"], main) == [main, ext]
    assert search_dirs(["hydra.searchpath=[]"], main) == [main]  # the command line's replaces the config's
