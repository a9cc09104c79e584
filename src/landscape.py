"""Entry point: `python src/landscape.py [hydra overrides]` maps mean reward over the plane through three SFT
ingredients (the paper's reward landscape) and logs the heatmap to MLflow (see README)."""

import sys

import hydra
from omegaconf import DictConfig

from salsa import cli
from train import ROOT  # importing the training entry point also sets SALSA_ROOT (outputs go to <repo>/logs)


@hydra.main(version_base="1.3", config_path="../conf", config_name="landscape")
def main(cfg: DictConfig) -> None:
    from salsa.stages.landscape import landscape_job

    cli.run(cfg, landscape_job)


if __name__ == "__main__":
    cli.check_argv(sys.argv[1:], ROOT / "conf", "landscape")  # a bad option or key fails in one line, before Hydra
    main()
