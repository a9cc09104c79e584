"""A 4-job sweep (ref × kl_coef) through the real entry point, two jobs at a time (joblib) on one stage cache, and a
landscape on the same cache: MLflow runs, each SFT ingredient trained once, the plots, and the comparison notebook."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

from salsa.infra.cache import StageCache
from salsa.stages.landscape import landscape_job
from tests.conftest import ROOT, make_cfg
from tests.test_plots import informative_png

pytestmark = pytest.mark.slow

RUN_NAMES = [f"ref={ref} ppo.kl_coef={kl}" for ref in ("sft", "soup3") for kl in ("0.01", "0.2")]
SMALL = ["debug=default", "logger=mlflow", "extras.torch_threads=1"]  # one thread per job: two jobs share 2 cores
# a process that serves a store (argv[1]) until it is killed, and writes the server's URL to argv[2] once it answers;
# it dies with the test run (argv[3]), should that be killed
SERVE_UNTIL_KILLED = """
import os, signal, sys, time
from pathlib import Path
from salsa.infra import mlflow_ui
if not mlflow_ui.die_with_parent(signal.SIGKILL) or os.getppid() != int(sys.argv[3]):
    sys.exit("no parent-death signal, or the parent is gone")
with mlflow_ui.serve(sys.argv[1]) as url:
    Path(sys.argv[2]).write_text(url)
    time.sleep(300)
"""


def entry_point(script: str, *overrides: str, multirun: bool = False) -> None:
    cmd = [sys.executable, str(ROOT / "src" / script), *(["-m"] if multirun else []), *SMALL, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("sweep_logs")
    entry_point(
        "train.py", "ppo.kl_coef=0.01,0.2", "ref=sft,soup3", f"paths.log_dir={log_dir}",
        f"hydra.sweep.dir={log_dir}/multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", multirun=True,
    )  # fmt: skip
    # in this process: the landscape's own entry point is checked in test_landscape.py, and a third process
    # would spend most of its time importing
    threads = torch.get_num_threads()
    try:
        landscape_job(
            make_cfg(log_dir, *SMALL[1:], "landscape.steps=3", "landscape.n_prompts=4", config_name="landscape")
        )
    finally:
        torch.set_num_threads(threads)  # extras.torch_threads=1 set it for this whole process
    return log_dir


def test_sweep_runs_and_ingredients_trained_once(logs):
    client = MlflowClient(tracking_uri=f"sqlite:///{logs}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("salsa").experiment_id])
    jobs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "eval/win_rate_vs_sft" in r.data.metrics]
    assert len(jobs) == 4
    assert sorted((r.data.params["ref.name"], float(r.data.params["ppo.kl_coef"])) for r in jobs) == [
        ("sft", 0.01), ("sft", 0.2), ("soup3", 0.01), ("soup3", 0.2),
    ]  # fmt: skip
    # each run is named by what distinguishes it (its reference and the sweep's overrides)
    assert sorted(r.info.run_name for r in jobs) == RUN_NAMES
    for r in jobs:
        assert 0.0 <= r.data.metrics["eval/win_rate_vs_sft"] <= 1.0 and "eval/kl_to_ref" in r.data.metrics
        assert r.data.tags["sweep"] == "multirun"  # relative to the log dir
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"generations.csv", "results.json", "plots"}

    # the cache's build log: every stage built once (the landscape reuses the sweep's ingredients, soup and RM)
    builds = StageCache(logs / "cache").builds()
    keys = [(b["stage"], b["key"]) for b in builds]
    assert len(keys) == len(set(keys))
    counts = {s: sum(1 for b in builds if b["stage"] == s) for s in ("base", "sft", "soup", "rm", "ppo", "landscape")}
    assert counts == {"base": 1, "sft": 3, "soup": 1, "rm": 1, "ppo": 4, "landscape": 1}
    # MLflow agrees: 3 SFT child runs in all; in each job every ingredient it needs was built there or tagged reused
    sft_runs = [r for r in runs if r.data.tags.get("stage") == "sft"]
    assert len(sft_runs) == 3
    for r in jobs:
        built = sum(1 for c in sft_runs if c.data.tags["mlflow.parentRunId"] == r.info.run_id)
        reused = sum(1 for k in r.data.tags if k.startswith("reused.sft."))
        assert built + reused == {"sft": 1, "soup3": 3}[r.data.params["ref.name"]]


def test_plots_exist_and_are_images(logs):
    sweep_dir = logs / "multirun"
    assert informative_png(sweep_dir / "frontier.png")
    for n in range(4):
        assert informative_png(sweep_dir / str(n) / "ppo_curves.png")
    assert informative_png(logs / "out" / "landscape.png")
    win_rates = (sweep_dir / "win_rates.csv").read_text().splitlines()
    assert win_rates[0] == "ref,0.01,0.2" and [line.split(",")[0] for line in win_rates[1:]] == ["sft", "soup3"]
    land = json.loads((logs / "out" / "landscape.json").read_text())
    assert land["marks"]["soup"] == pytest.approx([1 / 3, 1 / 3], abs=1e-4)  # the uniform soup of the three
    assert len(land["grids"]["gold_reward"]) == 3 and len(land["grids"]["gold_reward"][0]) == 3


def test_compare_runs_notebook(logs, monkeypatch):
    notebook = ROOT / "notebooks" / "compare_runs.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored without outputs
    monkeypatch.setenv("SALSA_LOG_DIR", str(logs))
    monkeypatch.setenv("SALSA_SWEEP", str(logs / "multirun"))  # only this sweep's runs (all of them, here)
    resources = {"metadata": {"path": str(notebook.parent)}}  # run from notebooks/, as Jupyter would
    NotebookClient(nb, timeout=300, kernel_name="python3", resources=resources).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "4 pipeline runs" in text and "mean reward at the marked models" in text
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("win rate vs SFT" in h for h in html)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the frontier and the landscape


def test_replication_report_from_a_real_sweep(logs, tmp_path):
    """The replication report reads a finished sweep's results, evaluations and PPO histories from the cache."""
    from salsa.analysis.replicate import load_jobs, report

    jobs, per_prompt = load_jobs(logs / "multirun")
    assert sorted((j.ref, j.kl_coef) for j in jobs) == [("sft", 0.01), ("sft", 0.2), ("soup3", 0.01), ("soup3", 0.2)]
    assert all(len(j.history["ppo/gold_reward"]) == 2 for j in jobs)  # debug PPO: 2 iterations
    paths = report(logs / "multirun", tmp_path, landscape=False, n_boot=200)
    table = pd.read_csv(paths["csv"])
    soup3 = table[table["ref"] == "soup3"]
    assert len(soup3) == 2 and (soup3["win_vs_ppo_low"] <= soup3["win_vs_ppo_mean"]).all()
    assert (soup3["win_vs_ppo_mean"] <= soup3["win_vs_ppo_high"]).all()
    text = paths["md"].read_text()
    assert "54.01" in text and "| soup3 | 0.01 | 1 |" in text
    assert informative_png(paths["png"])


def test_experiment_opens_as_model_training_with_views(logs):
    """The experiment is tagged as model training, and the runs table has a saved view of the sweep that shows its
    results first and the params it varies, filtered to its jobs."""
    client = MlflowClient(tracking_uri=f"sqlite:///{logs}/mlflow.db")
    tags = client.get_experiment_by_name("salsa").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.sweep-multirun"])
    state = json.loads(view["state"])
    assert view["name"] == "sweep multirun"
    assert state["selectedColumns"][0] == "metrics.`eval/win_rate_vs_sft`"
    assert "params.`ppo.kl_coef`" in state["selectedColumns"] and "params.`ref.name`" in state["selectedColumns"]
    assert state["searchFilter"] == "tags.sweep = 'multirun' and tags.kind = 'pipeline'"
    runs = client.search_runs([client.get_experiment_by_name("salsa").experiment_id], state["searchFilter"])
    assert len(runs) == 4  # the filter selects exactly the sweep's four jobs
    assert json.loads(tags["mlflow.sharedViewState.salsa-results"])["name"] == "salsa results"


def test_mlflow_holds_no_path_of_the_log_dir(logs):
    """No tag, param or saved view of the sweep's, its jobs', their stages' or the landscape's runs names a file of the
    log dir by its absolute path, so a moved or copied log dir still matches its store. The one absolute path is
    outside it: the repository (`paths.root_dir`)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{logs}/mlflow.db")
    exp = client.get_experiment_by_name("salsa")
    stored = {f"experiment tag {k}": v for k, v in exp.tags.items()}
    for r in client.search_runs([exp.experiment_id]):
        stored |= {f"{r.info.run_name}: tag {k}": v for k, v in r.data.tags.items()}
        stored |= {f"{r.info.run_name}: param {k}": v for k, v in r.data.params.items()}
    assert not {k: v for k, v in stored.items() if str(logs) in v or str(logs.resolve()) in v}
    absolute = {k.partition(": ")[2] for k, v in stored.items() if os.path.isabs(v)}
    assert absolute == {"param paths.root_dir"} and stored[f"{RUN_NAMES[0]}: param paths.root_dir"] == str(ROOT)
    jobs = client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'")
    assert sorted(r.data.tags["output_dir"] for r in jobs) == [f"multirun/{n}" for n in range(4)]
    assert {r.data.params["paths.log_dir"] for r in jobs} == {"."}


@pytest.mark.browser
def test_mlflow_ui_compares_the_sweep_in_chromium(logs, tmp_path):
    """What a person does: open the sweep's runs in `mlflow server` in Chromium, read each run's win rate and
    settings, select two runs and compare them."""
    pytest.importorskip("playwright", reason="needs playwright (part of the dev extra)")
    from salsa.infra import mlflow_ui

    if mlflow_ui.find_chromium() is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium; or set SALSA_CHROMIUM)")
    uri = f"sqlite:///{logs}/mlflow.db"
    with mlflow_ui.serve(uri) as base, mlflow_ui.browser_page() as page:
        mlflow_ui.open_runs_table(page, mlflow_ui.runs_url(base, uri, "sweep-multirun"))
        page.screenshot(path=str(tmp_path / "runs.png"))  # kept for a failing run's inspection
        names = RUN_NAMES
        header = page.locator(".ag-header").inner_text()
        assert "eval/win_rate_vs_sft" in header and "ppo.kl_coef" in header and "ref.name" in header
        rows = page.locator(".ag-center-cols-container .ag-row")
        assert rows.count() == 4
        # each row (the grid's rows carry the run's index) shows its own name, settings and win rate
        client = MlflowClient(tracking_uri=uri)
        for name in names:
            run = client.search_runs(
                [client.get_experiment_by_name("salsa").experiment_id], f"attributes.run_name = '{name}'"
            )[0]
            row_index = page.get_by_text(name, exact=True).locator("xpath=ancestor::*[@row-index]").first
            index = row_index.get_attribute("row-index")
            cells = page.locator(f".ag-center-cols-container .ag-row[row-index='{index}']").inner_text()
            assert run.data.params["ppo.kl_coef"] in cells and run.data.params["ref.name"] in cells
            assert f"{run.data.metrics['eval/win_rate_vs_sft']:g}"[:4] in cells
        # select two runs and compare them: the compare page plots the key metric for both
        checkboxes = page.locator(".ag-row .ag-selection-checkbox .ag-checkbox-input-wrapper")
        checkboxes.nth(0).click()
        checkboxes.nth(1).click()
        page.get_by_role("button", name="Compare").click()
        page.wait_for_url("**/compare-runs**")
        page.get_by_text("Run details").wait_for()
        body = page.locator("body").inner_text()
        assert "Comparing 2 Runs" in body and "eval/win_rate_vs_sft" in body
        assert sum(name in body for name in names) == 2


def live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of each process but zombies (exited, not yet reaped), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # the command name, in parentheses, may hold spaces
        except OSError:  # it exited while we looked
            continue
        if fields[0] not in ("Z", "X"):
            found[int(stat.parent.name)] = (int(fields[1]), int(fields[3]))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
def test_mlflow_server_dies_with_the_process_that_started_it(tmp_path):
    """A process killed with SIGKILL while `serve` runs (as a test run can be) runs no finaliser; its `mlflow server`
    and every worker that server started must go with it anyway."""
    ready = tmp_path / "url"
    cmd = [sys.executable, "-c", SERVE_UNTIL_KILLED, f"sqlite:///{tmp_path}/mlflow.db", str(ready), str(os.getpid())]
    child = subprocess.Popen(cmd)
    session = None
    try:
        deadline = time.monotonic() + 180
        while not ready.is_file():
            assert child.poll() is None, f"the serving process exited with {child.returncode}"
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        processes = live_processes()
        # the server's process group leads a session of its own, started by the child
        session = next(pid for pid, (ppid, _) in processes.items() if ppid == child.pid)
        members = {pid for pid, (_, sid) in processes.items() if sid == session}
        assert len(members) >= 4  # its leader, the server, uvicorn and the job runner (and its huey consumers)

        child.kill()
        child.wait()
        deadline = time.monotonic() + 60
        left = members
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = {pid for pid, (_, sid) in live_processes().items() if pid in members or sid == session}
        assert not left, f"{len(left)} of the server's {len(members)} processes outlived its parent: {sorted(left)}"
    finally:
        child.kill()
        child.wait()
        if session is not None:
            with suppress(ProcessLookupError):
                os.killpg(session, signal.SIGKILL)
