"""The plane through three ingredients: points, coordinates of a point, grid axes (hand-computed cases)."""

import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from salsa.errors import ConfigError
from salsa.stages.landscape import (
    LandscapeConfig,
    check_landscape,
    grid_axis,
    load_plane_point,
    parameters,
    plane_coords,
    plane_point,
)
from tests.conftest import CONF, ROOT


def test_grid_axis_includes_both_ends():
    assert grid_axis(-0.5, 1.5, 5) == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert grid_axis(0.0, 1.0, 2) == [0.0, 1.0]
    with pytest.raises(ValueError):
        grid_axis(0.0, 1.0, 1)


def test_plane_point_by_hand():
    t0, t1, t2 = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]), torch.tensor([1.0, 2.0])
    # θ0 + 0.5·(2, 0) + 0.25·(0, 2) = (2, 0.5)
    assert torch.equal(plane_point(t0, t1, t2, 0.5, 0.25), torch.tensor([2.0, 0.5]))
    assert torch.equal(plane_point(t0, t1, t2, 1.0, 0.0), t1) and torch.equal(plane_point(t0, t1, t2, 0.0, 1.0), t2)


def test_plane_point_keeps_dtype():
    t = torch.ones(3, dtype=torch.bfloat16)
    assert plane_point(t, 2 * t, 3 * t, 0.5, 0.5).dtype == torch.bfloat16


def test_coords_of_ingredients_and_uniform_soup():
    g = torch.Generator().manual_seed(0)
    f64 = {"generator": g, "dtype": torch.float64}  # so the soup itself carries no float32 rounding
    t0, t1, t2 = ({"w": torch.randn(4, 3, **f64), "b": torch.randn(3, **f64)} for _ in range(3))
    soup = {k: (t0[k] + t1[k] + t2[k]) / 3 for k in t0}
    assert plane_coords(soup, t0, t1, t2) == pytest.approx((1 / 3, 1 / 3), abs=1e-9)
    assert plane_coords(t1, t0, t1, t2) == pytest.approx((1.0, 0.0), abs=1e-9)
    assert plane_coords(t2, t0, t1, t2) == pytest.approx((0.0, 1.0), abs=1e-9)


def test_coords_project_onto_a_skewed_plane():
    # u = (1, 0, 0), v = (1, 1, 0): θ = (2, 1, 5) = 1·u + 1·v + (0, 0, 5), and (0, 0, 5) is orthogonal to the plane
    t0 = {"x": torch.zeros(3)}
    t1, t2 = {"x": torch.tensor([1.0, 0.0, 0.0])}, {"x": torch.tensor([1.0, 1.0, 0.0])}
    assert plane_coords({"x": torch.tensor([2.0, 1.0, 5.0])}, t0, t1, t2) == pytest.approx((1.0, 1.0))


def test_coords_refuse_a_degenerate_plane():
    t0, t1 = {"x": torch.zeros(2)}, {"x": torch.tensor([1.0, 1.0])}
    with pytest.raises(ValueError, match="do not span a plane"):
        plane_coords(t1, t0, t1, {"x": torch.tensor([2.0, 2.0])})


def test_load_plane_point_sets_every_parameter():
    nets = [torch.nn.Linear(2, 2) for _ in range(3)]
    t0, t1, t2 = (parameters(n) for n in nets)
    model = torch.nn.Linear(2, 2)
    load_plane_point(model, t0, t1, t2, 0.5, 0.25)
    for name, p in model.named_parameters():
        expected = t0[name] + 0.5 * (t1[name] - t0[name]) + 0.25 * (t2[name] - t0[name])
        assert torch.allclose(p, expected)


def landscape_cfg(tmp_path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="landscape", overrides=[f"paths.log_dir={tmp_path}", "debug=default", *overrides])


def test_landscape_config_composes_on_train_and_mirrors_the_code(tmp_path):
    cfg = landscape_cfg(tmp_path, "soup=greedy")
    check_landscape(cfg)
    assert set(cfg.landscape) == set(LandscapeConfig.__dataclass_fields__)
    assert LandscapeConfig.from_cfg(cfg.landscape) == LandscapeConfig()  # the yaml's defaults are the code's
    assert cfg.soup.method == "greedy" and cfg.model.arch.hidden_size == 32  # train's groups and debug apply


def test_entry_point_composes(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "src" / "landscape.py"),
        "--cfg",
        "job",
        f"paths.log_dir={tmp_path}",
        "landscape.steps=3",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "steps: 3" in out and "n_prompts: 64" in out


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("landscape.steps=1", "landscape.steps"),
        ("landscape.ingredients=[0,1,1]", "landscape.ingredients"),
        ("landscape.ingredients=[0,1,2,3]", "landscape.ingredients"),
        ("landscape.n_prompts=0", "landscape.n_prompts"),
        ("landscape.b_min=2.0", "landscape.b_min"),
    ],
)
def test_bad_landscape_settings_are_refused_by_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        check_landscape(landscape_cfg(tmp_path, override))
