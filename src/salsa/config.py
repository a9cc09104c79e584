"""Typed configs of the config groups, and the values each setting allows (one place for both)."""

from __future__ import annotations

import os
from pathlib import Path

STAGES = ("base", "sft", "soup", "rm", "ppo", "eval")
SOUP_METHODS = ("uniform", "weighted", "greedy")
KL_ESTIMATORS = ("k1", "k3")
QUANT = ("nf4", "none")  # model.quant of hub/local checkpoints (salsa.models.qlora)

# the repository this package runs from (src/salsa/config.py -> the repo root), unless SALSA_ROOT says otherwise
REPO_ROOT = Path(os.environ.get("SALSA_ROOT", Path(__file__).resolve().parents[2]))
CONF_DIR = REPO_ROOT / "conf"
