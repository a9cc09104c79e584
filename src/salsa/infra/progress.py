"""Progress bars: Lightning's rich bar for training stages, `track` for loops outside a Trainer (generation, soups).

Both stay silent when progress bars are switched off (`extras.progress_bar=false`) or when stdout is not a terminal
(log files, CI, sweep jobs), so logs hold messages and results, not bar redraws.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.errors import LiveError
from rich.progress import Progress

T = TypeVar("T")

_enabled = True  # process-wide switch, set from `extras.progress_bar` by the entry points


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


def interactive() -> bool:
    """Whether bars should be drawn: switched on and stdout is a terminal."""
    return _enabled and sys.stdout.isatty()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items` with a transient rich progress bar when `interactive()`, plainly otherwise."""
    if not interactive():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    progress = Progress(transient=True)
    try:
        progress.start()
    except LiveError:  # another live display (e.g. a Trainer's bar) is active: rich allows only one
        yield from items
        return
    try:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
    finally:
        progress.stop()


def _stage_progress_bar() -> type:
    from pytorch_lightning.callbacks import RichProgressBar

    class StageProgressBar(RichProgressBar):
        """Lightning's rich progress bar for one stage's Trainer, disabled off a terminal or when `enabled` is
        false."""

        def __init__(self, enabled: bool = True, leave: bool = False, **kwargs) -> None:
            super().__init__(leave=leave, **kwargs)
            if not (enabled and sys.stdout.isatty()):
                self.disable()

    StageProgressBar.__module__ = __name__
    return StageProgressBar


def __getattr__(name: str):
    """`StageProgressBar` subclasses Lightning's bar, so it is made on first use: `track` alone (the soup command
    line uses it) does not import Lightning, which takes seconds."""
    if name == "StageProgressBar":
        globals()[name] = _stage_progress_bar()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
