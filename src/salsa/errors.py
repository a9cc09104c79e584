"""Errors a user can fix. `src/train.py` prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class SalsaError(Exception):
    """Base class of errors caused by the input (config, files, data), or by training going non-finite."""


class ConfigError(SalsaError, ValueError):
    """A config value that is not allowed. The message starts with the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class CheckpointError(SalsaError, ValueError):
    """A model directory that is missing, incomplete or not in safetensors format."""
