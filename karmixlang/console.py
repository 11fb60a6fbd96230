"""Progress reporting for `kmx run`: a rich progress bar on a terminal, a few plain lines
otherwise (logs and CI stay readable)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.text import Text


class BarProgress:
    """Bytes drive the bar, the rate and the ETA (they track the work better than key counts:
    keys range from a few bytes to hundreds of MB); the key count is shown beside them."""

    def __init__(self, console: Console):
        self.progress = Progress(TextColumn("merging"), BarColumn(),
                                 TextColumn("{task.fields[keys]:,}/{task.fields[total_keys]:,} keys"),
                                 DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=console,
                                 transient=True)
        self.task = None
        self.keys = 0

    def start(self, keys: int, done: int, total_bytes: int, done_bytes: int) -> None:
        self.keys = done
        self.progress.start()
        self.task = self.progress.add_task("merge", total=max(1, total_bytes),
                                           completed=done_bytes, keys=done, total_keys=keys)

    def advance(self, keys: int, nbytes: int) -> None:
        self.keys += keys
        self.progress.update(self.task, advance=nbytes, keys=self.keys)

    def finish(self) -> None:
        self.progress.stop()


class LineProgress:
    """One line at each tenth of the keys."""

    def __init__(self, console: Console):
        self.console = console
        self.total = self.done = self.next_report = 0
        self.t0 = 0.0

    def start(self, keys: int, done: int, total_bytes: int, done_bytes: int) -> None:
        self.total, self.done, self.t0 = keys, done, time.monotonic()
        self.next_report = done + max(1, keys // 10)
        if done:
            self.console.print(Text(f"resuming: {done:,} of {keys:,} keys already written"))

    def advance(self, keys: int, nbytes: int) -> None:
        self.done += keys
        if self.done >= self.next_report or self.done == self.total:
            self.next_report = self.done + max(1, self.total // 10)
            rate = self.done / max(1e-9, time.monotonic() - self.t0)
            self.console.print(Text(f"{self.done:,}/{self.total:,} keys ({rate:,.0f} keys/s)"))

    def finish(self) -> None:
        pass


def make_progress(console: Console):
    return BarProgress(console) if console.is_terminal else LineProgress(console)
