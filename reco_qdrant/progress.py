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
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

DESCRIPTION_WIDTH = 28  # cells; with the other columns a bar line fits an 80-column terminal


class ItemsPerSecond(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:,.0f} it/s" if task.speed else "- it/s", style="progress.data.speed")


def short_description(description: str, width: int = DESCRIPTION_WIDTH) -> str:
    """A description cut to `width` cells, keeping its first word and its end ("ingest …/birds/images"): an
    ingest names its folder by its full path."""
    if len(description) <= width:
        return description
    head, _, rest = description.partition(" ")
    keep = width - len(head) - 2
    return f"{head} …{rest[-keep:]}" if rest and keep >= 8 else description[: width - 1] + "…"


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr (items, items/s, ETA) that fits the terminal's width, 80 columns
    included (its last column left free: some terminals wrap a line that fills it); yields `advance(n)`."""
    if not enabled:
        yield lambda n: None
        return
    width = Console(stderr=True).width
    cols = [SpinnerColumn(), TextColumn("{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=None, table_column=Column(ratio=1)), MofNCompleteColumn(), ItemsPerSecond(),
            TimeRemainingColumn()]
    console = Console(stderr=True, width=max(width - 1, 40))
    with Progress(*cols, console=console, transient=False, expand=True) as p:
        task = p.add_task(short_description(description), total=total)
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
