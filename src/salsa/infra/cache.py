"""The stage cache: every stage's output lives in a directory named by a hash of what determines it.

    <cache_dir>/<stage>/<key>/            finished output + manifest.json (never modified once renamed here)
    <cache_dir>/<stage>/<key>.partial/    work in progress: checkpoints of an interrupted build, resumed on rerun
    <cache_dir>/<stage>/<key>.lock        file lock held while building (released by the OS if the process dies)
    <cache_dir>/builds.jsonl              one line per finished build: how many times each stage was trained

A build writes into the `.partial` directory under the lock and publishes it with one atomic `rename`, so a reader
never sees half a stage and two sweep jobs never build the same stage twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

MANIFEST = "manifest.json"
# bump when a change to the code makes old cache entries wrong (3: planned loaders served only their first chunk of
# batches, again each epoch, to pretraining, SFT and reward models)
CACHE_VERSION = 3


def stage_key(stage: str, spec: dict[str, Any]) -> str:
    """A short stable hash of a stage's name and the JSON-serialisable spec that determines its output."""
    blob = json.dumps({"stage": stage, "version": CACHE_VERSION, "spec": spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Entry:
    """A finished stage output."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]
    reused: bool

    @property
    def run_id(self) -> str | None:
        return self.manifest.get("run_id")


class StageCache:
    def __init__(self, root: str | os.PathLike, lock_timeout: float = -1):
        self.root = Path(root)
        self.lock_timeout = lock_timeout

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Entry | None:
        path = self.path(stage, key)
        manifest = path / MANIFEST
        if not manifest.is_file():
            return None
        return Entry(stage, key, path, json.loads(manifest.read_text()), reused=True)

    def get_or_build(
        self,
        stage: str,
        spec: dict[str, Any],
        build: Callable[[Path], dict[str, Any] | None],
        extra: dict[str, Any] | None = None,
    ) -> Entry:
        """Return the cached entry for (stage, spec), building it with `build(workdir)` if it does not exist.

        `build` writes its files into `workdir` (which may hold checkpoints of an interrupted earlier attempt)
        and returns metadata (metrics, run id) stored in the manifest.
        """
        key = stage_key(stage, spec)
        found = self.lookup(stage, key)
        if found is not None:
            return found
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / stage / f"{key}.lock"), timeout=self.lock_timeout):
            found = self.lookup(stage, key)  # another process may have finished it while we waited
            if found is not None:
                return found
            work = self.root / stage / f"{key}.partial"
            work.mkdir(exist_ok=True)
            started = time.time()
            meta = build(work) or {}
            manifest = {
                "stage": stage,
                "key": key,
                "spec": spec,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seconds": round(time.time() - started, 3),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                **(extra or {}),
                **meta,
            }
            _write_json_atomic(work / MANIFEST, manifest)
            final = self.path(stage, key)
            if final.exists():  # a stale copy without manifest (never published): replace it
                shutil.rmtree(final)
            os.rename(work, final)
            with open(self.root / "builds.jsonl", "a") as f:
                f.write(json.dumps({"stage": stage, "key": key, "created": manifest["created"]}) + "\n")
            return Entry(stage, key, final, manifest, reused=False)

    def builds(self) -> list[dict[str, Any]]:
        """Every finished build, in order (a stage built twice would appear twice)."""
        log = self.root / "builds.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _hold_lock(path: str, ready, release) -> None:  # pragma: no cover - runs in a child process
    with FileLock(path):
        ready.set()
        release.wait(60)


def check_locking(directory: str | os.PathLike, timeout: float = 30.0) -> str:
    """Whether the file locks the stage cache relies on work in `directory` (e.g. a shared filesystem that SLURM jobs
    on several nodes use): another process takes a lock there, and this one must then fail to take it and succeed
    once it is released. Returns what happened; raises RuntimeError when the lock does not exclude."""
    import multiprocessing as mp

    from filelock import Timeout

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    path = str(root / f".lock-check-{socket.gethostname()}-{os.getpid()}.lock")
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(path, ready, release))
    holder.start()
    try:
        if not ready.wait(timeout):
            raise RuntimeError(f"a second process could not take a lock in {root} within {timeout:.0f} s")
        try:
            with FileLock(path, timeout=0):
                raise RuntimeError(
                    f"file locks do not exclude each other in {root}: two processes held one lock at once. Two sweep "
                    "jobs could build the same stage; put paths.cache_dir on a filesystem with working flock (on "
                    "Lustre mount it with -o flock)"
                )
        except Timeout:
            pass
    finally:
        release.set()
        holder.join(timeout)
    with FileLock(path, timeout=timeout):
        pass
    Path(path).unlink(missing_ok=True)
    return f"file locks work in {root}: a lock held by another process excluded this one and was released"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m salsa.infra.cache", description="Check that the stage cache's file locks work in a directory."
    )
    parser.add_argument("--check-lock", required=True, metavar="DIR", help="e.g. the shared paths.cache_dir")
    print(check_locking(parser.parse_args().check_lock))
