"""Entry point: `python src/landscape.py [hydra overrides]` maps mean reward over the plane through three SFT
ingredients (the paper's reward landscape) and logs the heatmap to MLflow (see README)."""

import hydra
from omegaconf import DictConfig

import train  # noqa: F401  (sets SALSA_ROOT and puts src/ on sys.path, as for the training entry point)


@hydra.main(version_base="1.3", config_path="../conf", config_name="landscape")
def main(cfg: DictConfig) -> None:
    from salsa.landscape import landscape_job

    landscape_job(cfg)


if __name__ == "__main__":
    main()
