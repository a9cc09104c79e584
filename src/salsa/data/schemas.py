"""Where the hub datasets' splits live on disk and which columns each needs (no heavy imports: used by validation).

Local copies are one file per split under `data.path`: `<split>.jsonl`, `<split>.json` or `<split>.parquet`, or the
hub's own layout `data/<split>-*.parquet`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLIT_COLUMNS: dict[str, dict[str, list[str]]] = {
    "ultrafeedback": {
        "train_sft": ["prompt", "messages"],
        "test_sft": ["prompt", "messages"],
        "train_prefs": ["prompt", "chosen", "rejected"],
        "test_prefs": ["prompt", "chosen", "rejected"],
    },
    "hh_rlhf": {"train": ["chosen", "rejected"], "test": ["chosen", "rejected"]},
}


class DataFileError(ValueError):
    """A local data file that is missing, empty or lacks a column."""


def split_file(path: str | os.PathLike, split: str) -> Path:
    """The local file of `split` under `path`."""
    root = Path(path)
    if not root.is_dir():
        raise DataFileError(f"{root} is not a directory")
    candidates = [root / f"{split}{ext}" for ext in FORMATS] + sorted(root.glob(f"data/{split}-*"))
    for c in candidates:
        if c.is_file() and c.suffix in FORMATS:
            return c
    raise DataFileError(f"{root} has no file for split {split!r} (expected {split}.jsonl or {split}.parquet)")


def file_columns(file: Path) -> list[str]:
    """Column names of a jsonl/json/parquet file, from its first row or schema; raises DataFileError if empty."""
    if file.stat().st_size == 0:
        raise DataFileError(f"{file} is empty")
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.read_metadata(file)
        if meta.num_rows == 0:
            raise DataFileError(f"{file} has no rows")
        return list(meta.schema.names)
    with open(file) as f:
        if file.suffix == ".json":
            rows = json.load(f)
            first = rows[0] if isinstance(rows, list) and rows else None
        else:
            first = next((json.loads(line) for line in f if line.strip()), None)
    if not isinstance(first, dict):
        raise DataFileError(f"{file} has no rows")
    return list(first)


def check_local_dataset(kind: str, path: str | os.PathLike) -> None:
    """Every split file of dataset `kind` exists under `path`, has rows, and has the columns the loader reads."""
    for split, needed in SPLIT_COLUMNS[kind].items():
        file = split_file(path, split)
        columns = file_columns(file)
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataFileError(f"{file} has no column {missing[0]!r} (columns: {columns}); {kind} needs {needed}")
