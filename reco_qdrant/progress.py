"""One progress bar for every long step (ingest, encoding, neighbour cache, epochs, copy)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class ItemsPerSecond(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:,.0f} it/s" if task.speed else "- it/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr (items, items/s, ETA); yields `advance(n)`."""
    if not enabled:
        yield lambda n: None
        return
    cols = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), ItemsPerSecond(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True), transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)


@contextmanager
def status_line(description: str, enabled: bool = True) -> Iterator[None]:
    """One line on stderr before a long step that cannot report progress (it holds the GIL), one after."""
    if not enabled:
        yield
        return
    import time

    console = Console(stderr=True)
    console.print(f"{description} ...", highlight=False)
    t0 = time.perf_counter()
    yield
    console.print(f"{description}: done in {time.perf_counter() - t0:.1f} s", highlight=False)
