"""MLflow's web UI, driven from Python: serve a store, open its runs table in a real Chromium, take a screenshot.

The browser test uses it to check that a person can compare runs there, and

    python -m salsa.infra.mlflow_ui --out docs/mlflow_runs.png      # [--log-dir logs] [--view <id>]

regenerates the docs' screenshot from the newest sweep's saved view (or the experiment's `salsa-results` view).
Chromium comes from the system (Debian: `apt-get install chromium`; or set SALSA_CHROMIUM to a Chrome/Chromium
binary); Playwright drives it and never downloads a browser of its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from salsa.errors import SalsaError
from salsa.infra.tracking import RESULTS_VIEW, VIEW_TAG

# headless, and quiet on a closed network: no background fetches, updates, sync or QUIC
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


class UIError(SalsaError):
    """The MLflow UI or the browser could not be started or did not show what was expected."""


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# how `start_guarded` runs `guard` in a fresh interpreter: its argv is the parent's pid, then the command
GUARD = "import sys; from salsa.infra.mlflow_ui import guard; sys.exit(guard(int(sys.argv[1]), sys.argv[2:]))"


class _Stop(Exception):
    """SIGTERM reached the guard: its parent died, or `stop_group` is stopping the group."""


def _raise_stop(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the guard's own SIGTERM to its group reaches it too
    raise _Stop


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have Linux send `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG); False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def guard(parent: int, cmd: Sequence[str], poll: float = 1.0, grace: float = 10.0) -> int:
    """Run `cmd` and return its exit status; when `parent` dies first, or SIGTERM arrives, stop this process group
    instead: SIGTERM, then SIGKILL after `grace` seconds (this process included).

    `start_guarded` makes it the leader of a new session. A parent killed with SIGKILL runs no finaliser, and
    `mlflow server`'s workers (uvicorn, the job runner and its huey consumers) would outlive it; this process
    outlives it by design, to take the whole group down."""
    signal.signal(signal.SIGTERM, _raise_stop)
    die_with_parent(signal.SIGTERM)
    server = None
    try:
        if os.getppid() != parent:  # it died before the parent-death signal was armed
            raise _Stop
        # the server gets the same signal if this process is killed alone: mlflow stops its workers on SIGTERM
        server = subprocess.Popen(cmd, preexec_fn=die_with_parent)
        while True:
            try:
                return server.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                if os.getppid() != parent:  # where there is no parent-death signal (not Linux)
                    raise _Stop from None
    except _Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        if server is not None:
            with suppress(subprocess.TimeoutExpired):
                server.wait(timeout=grace)
        os.killpg(0, signal.SIGKILL)  # the workers that are still shutting down, and this process
        return 1


def start_guarded(cmd: Sequence[str], **popen) -> subprocess.Popen:
    """`cmd` in a process group of its own that stops when this process exits, however it exits: the group's
    leader is `guard`, so `stop_group` on the returned process stops `cmd` and everything it started."""
    return subprocess.Popen([sys.executable, "-c", GUARD, str(os.getpid()), *cmd], start_new_session=True, **popen)


def find_chromium() -> str | None:
    """A Chromium or Chrome binary: $SALSA_CHROMIUM, else the first on PATH."""
    explicit = os.environ.get("SALSA_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to the process group of `proc`, SIGKILL to what is left after `timeout` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                proc.poll()
                return
            proc.poll()
            time.sleep(0.2)


@contextmanager
def serve(tracking_uri: str, timeout: float = 120.0) -> Iterator[str]:
    """`mlflow server` on `tracking_uri` (one worker, a free local port) until the block ends; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]  # fmt: skip
    # its own process group: the server starts worker processes of its own, which must stop with it, also when this
    # process is killed (a test run's SIGKILL) and the `finally` below never runs
    proc = start_guarded(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise UIError(f"mlflow server exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise UIError(f"mlflow server did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc)


@contextmanager
def browser_page(width: int = 1600, height: int = 720):
    """A page of a headless system Chromium, driven by Playwright."""
    executable = find_chromium()
    if executable is None:
        raise UIError("no Chromium found: install one (Debian: apt-get install chromium) or set SALSA_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def open_runs_table(page, url: str) -> None:
    """Open a runs-table URL and wait until its rows are drawn; close the assistant side panel if it is open."""
    page.goto(url)
    page.locator(".ag-row").first.wait_for(state="visible")
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.last.click()
    page.wait_for_timeout(500)  # let the grid lay out its columns


def views(tracking_uri: str, experiment: str = "salsa") -> dict[str, str]:
    """The experiment's saved views of its runs table: id -> tag value (the newest sweep's last by name)."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        raise UIError(f"{tracking_uri} has no experiment {experiment!r}: run the pipeline with logger=mlflow first")
    return {k.removeprefix(VIEW_TAG): v for k, v in sorted(exp.tags.items()) if k.startswith(VIEW_TAG)}


def default_view(tracking_uri: str, experiment: str = "salsa") -> str:
    """The newest sweep's view (sweep ids carry the sweep folder's date and time), else the results view."""
    sweeps = sorted(v for v in views(tracking_uri, experiment) if v.startswith("sweep-"))
    return sweeps[-1] if sweeps else RESULTS_VIEW


def runs_url(base: str, tracking_uri: str, view: str, experiment: str = "salsa") -> str:
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    return f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={view}"


def main(argv: list[str] | None = None) -> None:
    root = Path(os.environ.get("SALSA_ROOT", Path.cwd()))
    parser = argparse.ArgumentParser(prog="python -m salsa.infra.mlflow_ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", type=Path, default=root / "logs", help="paths.log_dir of the runs (logs/)")
    parser.add_argument("--experiment", default="salsa", help="MLflow experiment (task_name)")
    parser.add_argument("--view", help="a saved view's id (default: the newest sweep's, else salsa-results)")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow_runs.png"), help="where the PNG goes")
    args = parser.parse_args(argv)
    db = args.log_dir / "mlflow.db"
    try:
        if not db.is_file():
            raise UIError(f"{db} does not exist: run the pipeline with logger=mlflow first")
        uri = f"sqlite:///{db.resolve()}"
        view = args.view or default_view(uri, args.experiment)
        with serve(uri) as base, browser_page() as page:
            url = runs_url(base, uri, view, args.experiment)
            open_runs_table(page, url)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
    except SalsaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.out} <- view {view} of {uri}")


if __name__ == "__main__":
    main()
