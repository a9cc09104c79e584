"""Progress bars draw only when switched on and stdout is a terminal."""

import sys

import pytest
from pytorch_lightning import Callback

from salsa.infra import progress
from salsa.infra.context import Context
from salsa.infra.progress import StageProgressBar, track
from tests.conftest import make_cfg


@pytest.fixture
def terminal(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    progress.set_enabled(True)  # an entry point run earlier in this process may have switched bars off
    yield
    progress.set_enabled(True)


def test_bars_are_off_without_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert not progress.interactive()
    assert StageProgressBar(enabled=True).is_disabled
    assert list(track(iter([1, 2, 3]), "x")) == [1, 2, 3]


def test_bars_follow_the_switch_on_a_terminal(terminal):
    assert progress.interactive() and StageProgressBar(enabled=True).is_enabled
    assert StageProgressBar(enabled=False).is_disabled
    progress.set_enabled(False)
    assert not progress.interactive()


def test_track_yields_everything_while_drawing(terminal):
    assert list(track(range(4), "counting")) == [0, 1, 2, 3]
    # a bar inside a bar: rich allows one live display, the inner loop runs plainly
    assert [(i, list(track(range(i), "inner"))) for i in track(range(3), "outer")] == [(0, []), (1, [0]), (2, [0, 1])]


def test_stage_callbacks_join_the_configured_progress_bar(tmp_path):
    class Marker(Callback):
        pass

    ctx = Context.from_cfg(make_cfg(tmp_path))
    trainer = ctx.trainer(tmp_path, None, callbacks=[Marker()])
    names = [type(c).__name__ for c in trainer.callbacks]
    assert names.count("StageProgressBar") == 1 and "Marker" in names
    assert isinstance(trainer.progress_bar_callback, StageProgressBar)
