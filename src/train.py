"""Entry point: `python src/train.py [hydra overrides]` runs the SALSA pipeline (see README)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SALSA_ROOT", str(ROOT))  # paths.root_dir: outputs go to <repo>/logs from any cwd
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from salsa import cli  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return cli.run(cfg)


if __name__ == "__main__":
    cli.check_argv(sys.argv[1:], ROOT / "conf")  # a bad option or key fails in one line, before Hydra
    main()
