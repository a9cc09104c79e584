"""A hub model or dataset that cannot be had is one line before any stage is built: unreachable, gated, missing."""

import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from salsa.validate import hub_problem
from tests.conftest import ROOT


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a gated repo without an accepted licence, or a missing one."""

    def do_HEAD(self):  # noqa: N802
        gated = "gated" in self.path
        self.send_response(401 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access to model is restricted" if gated else "Repository not found")
        self.end_headers()

    do_GET = do_HEAD  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # as HF_ENDPOINT would set them at import
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    yield
    server.shutdown()


def test_gated_and_missing_models_say_what_to_do(fake_hub):
    gated = hub_problem("acme/gated-model", "model.name_or_path=/a/local/copy")
    assert "is gated" in gated and "accept its licence" in gated and "HF_TOKEN" in gated
    missing = hub_problem("acme/no-such-model", "model.name_or_path=/a/local/copy")
    assert "not on the hub, or is private" in missing


def test_unreachable_hub_is_one_line_in_seconds_before_any_stage(tmp_path):
    """No HF_HUB_OFFLINE, nothing cached, the hub's address refuses connections: one line naming the model and what to
    do, a non-zero exit within 10 s, and no stage built."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.time()
    r = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "model=gemma2b", f"paths.log_dir={tmp_path / 'logs'}"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert time.time() - started < 10
    assert r.returncode != 0 and "Traceback" not in r.stderr + r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: model.name_or_path: google/gemma-2b is not in the local Hugging Face cache")
    assert "cannot be reached" in lines[0] and "HF_TOKEN" in lines[0] and "model.name_or_path=" in lines[0]
    assert not (tmp_path / "logs" / "cache").exists()
