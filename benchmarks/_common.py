"""What both benchmarks share: per-process measurement and the separate virtual environments of the tools we
compare against (kept out of the project's own environment, so its dependencies stay current)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"  # ignored by git


@dataclass
class Measured:
    returncode: int
    wall_s: float
    cpu_s: float  # user + system time of the process (and its reaped children)
    peak_rss_bytes: int
    output: str


# Runs one command and reports its wall time and peak RSS. It runs in a bare interpreter of its own, because Linux
# counts the RSS a child had when it called exec (the parent's, after fork) into the child's ru_maxrss: spawned
# from this benchmark's process, which holds torch and models, every child would inherit that number.
_SPAWNER = """
import json, os, subprocess, sys, time
cmd = json.loads(sys.argv[1])
start = time.perf_counter()
proc = subprocess.Popen(cmd)
_, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (and its reaped children's)
proc.returncode = os.waitstatus_to_exitcode(status)
wall = time.perf_counter() - start
cpu = usage.ru_utime + usage.ru_stime
print("\\n@@measured " + json.dumps({"code": proc.returncode, "wall": wall, "cpu": cpu, "rss": usage.ru_maxrss * 1024}))
"""


def run_measured(cmd: list[str], env: dict[str, str] | None = None, echo: bool = False) -> Measured:
    """Run `cmd` in its own process; return its exit code, wall time, own peak resident set size and output."""
    proc = subprocess.run(
        [sys.executable, "-c", _SPAWNER, json.dumps(cmd)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _, tail = proc.stdout.rpartition("@@measured ")
    if not tail:
        return Measured(proc.returncode or 1, 0.0, 0.0, 0, proc.stdout)
    m = json.loads(tail)
    if echo:
        print(output, end="")
    return Measured(m["code"], m["wall"], m["cpu"], m["rss"], output)


def sync() -> None:
    """Wait for queued device work, so a phase's time is its own (nothing to wait for on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PhaseClock:
    """Seconds per phase of each PPO iteration, measured the same way for both trainers: generation and scoring
    are summed over timed calls, the update runs from its start to the iteration's end, and `other` is the rest.

    Each phase gets wall-clock seconds and this process's CPU seconds (`cpu_<phase>`, all its threads): on a
    machine shared with other work, wall time includes waiting for a core and CPU time does not.
    """

    PHASES = ("generation", "scoring")

    def __init__(self):
        self.iterations: list[dict] = []
        self.current = self._zero()
        self.last: tuple[float, float] | None = None
        self.update_start: tuple[float, float] | None = None
        self.shape: dict = {}

    @staticmethod
    def _now() -> tuple[float, float]:
        sync()
        return time.perf_counter(), time.process_time()

    def _zero(self) -> dict[str, float]:
        return {k: 0.0 for phase in self.PHASES for k in (phase, f"cpu_{phase}")}

    def start(self) -> None:
        self.last = self._now()

    def mark_update(self) -> None:
        if self.update_start is None:
            self.update_start = self._now()

    def timed(self, phase: str, fn):
        def wrapper(*args, **kwargs):
            wall, cpu = self._now()
            out = fn(*args, **kwargs)
            wall_end, cpu_end = self._now()
            self.current[phase] += wall_end - wall
            self.current[f"cpu_{phase}"] += cpu_end - cpu
            return out

        return wrapper

    def end_iteration(self) -> None:
        now = self._now()
        it = dict(self.current)
        for prefix, i in (("", 0), ("cpu_", 1)):
            it[f"{prefix}iteration"] = now[i] - self.last[i]
            it[f"{prefix}update"] = now[i] - self.update_start[i]
            it[f"{prefix}other"] = (
                it[f"{prefix}iteration"] - it[f"{prefix}update"] - sum(it[f"{prefix}{phase}"] for phase in self.PHASES)
            )
        self.iterations.append({**it, **self.shape})
        self.last, self.update_start, self.current = now, None, self._zero()


def torch_requirement() -> str:
    """The torch release this environment runs, so a comparison venv computes with the same kernels."""
    return f"torch=={torch.__version__.split('+')[0]}"


def ensure_venv(name: str, packages: list[str], log=print) -> tuple[Path | None, str]:
    """The python of `benchmarks/.venvs/<name>` with torch (first, same release as ours) and `packages` installed.

    Returns (python, "") or (None, why it could not be made). A marker file records what was installed, so a later
    run reuses the venv.
    """
    venv = VENVS / name
    python = venv / "bin" / "python"
    wanted = "\n".join([torch_requirement(), *packages])
    marker = venv / ".installed"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python, ""
    log(f"[venv] creating {venv} with {torch_requirement()} then {' '.join(packages)} (once; takes minutes)")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        # torch first: installed alone, pip takes the CPU wheel where one is available instead of a CUDA build
        [str(python), "-m", "pip", "install", "-q", torch_requirement()],
        [str(python), "-m", "pip", "install", "-q", *packages],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            return None, f"`{' '.join(step[2:])}` failed:\n" + "\n".join(tail)
    marker.write_text(wanted)
    return python, ""


def bare_trainer(iterations: int, **overrides):
    """A Lightning Trainer that runs `iterations` PPO iterations and nothing else: no logger, checkpoints,
    progress bar or model summary, so only the PPO work is timed."""
    import pytorch_lightning as pl  # here, so the TRL venv (no Lightning) can import this module

    settings = {
        "accelerator": "auto",
        "devices": 1,
        "max_epochs": iterations,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
        "log_every_n_steps": 1,
    }
    return pl.Trainer(**{**settings, **overrides})


def human_bytes(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if abs(n_bytes) >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"
