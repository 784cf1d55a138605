"""Progress of a run: rows done, rows/s, ETA and errors, in a terminal, a notebook or a log."""

from __future__ import annotations

import sys
import time
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Mode = Literal["auto", "bar", "notebook", "log", "none"]
MODES: tuple[str, ...] = ("auto", "bar", "notebook", "log", "none")


class RunProgress:
    """Counts rows as partitions finish and shows them; ``mode`` picks a live bar, log lines or nothing."""

    def __init__(self, mode: Mode = "auto", console: Console | None = None, log_every: float = 10.0) -> None:
        self.console = console or Console(stderr=True)
        if mode == "auto":
            mode = "notebook" if is_notebook() else ("bar" if self.console.is_terminal else "log")
        self.mode = mode
        self._display: Any = None
        self.log_every = log_every
        self.total = self.done = self.errors = self.skipped = 0
        self._start = self._last_log = time.monotonic()
        self._bar: Progress | None = None
        self._task = None

    def note(self, message: str) -> None:
        if self.mode != "none":
            self.console.print(message, highlight=False, soft_wrap=True, markup=False)

    def start(self, total: int, already_done: int = 0, already_errors: int = 0) -> None:
        self.total, self.done, self.errors, self.skipped = total, already_done, already_errors, already_done
        self._start = self._last_log = time.monotonic()
        if self.mode == "bar":
            self._bar = Progress(
                TextColumn("[bold]rows"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"), TextColumn("errors {task.fields[errors]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("run", total=total, completed=already_done, rate="-", errors=already_errors)
        elif self.mode == "notebook":
            from IPython.display import HTML, display

            self._display = display(HTML(self.html()), display_id=True)

    def advance(self, rows: int, errors: int = 0) -> None:
        self.done += rows
        self.errors += errors
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.rate:,.0f}", errors=self.errors)
        elif self.mode == "notebook" and self._display is not None and time.monotonic() - self._last_log >= 0.5:
            self._last_log = time.monotonic()
            self._update_notebook()
        elif self.mode == "log" and time.monotonic() - self._last_log >= self.log_every:
            self._last_log = time.monotonic()
            self.note(self.line())

    def skip(self, rows: int, errors: int = 0) -> None:
        """Rows finished by an earlier run (a resume): counted as done, but not in this run's rate."""
        self.skipped += rows
        self.advance(rows, errors)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self._start
        return (self.done - self.skipped) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def line(self) -> str:
        eta = self.eta()
        eta_text = f"{eta:,.0f} s" if eta is not None else "-"
        return (f"rows {self.done:,}/{self.total:,}  {self.rate:,.1f} rows/s  errors {self.errors:,}  "
                f"ETA {eta_text}")

    def html(self) -> str:
        """The notebook display: a progress bar and the same figures as the terminal's."""
        import html

        return (f"<div><progress value='{self.done}' max='{max(1, self.total)}' style='width:60%'></progress> "
                f"<code>{html.escape(self.line())}</code></div>")

    def _update_notebook(self) -> None:
        from IPython.display import HTML

        self._display.update(HTML(self.html()))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.mode == "notebook" and self._display is not None:
            self._update_notebook()
        elif self.mode == "log":
            self.note(self.line())


def is_notebook() -> bool:
    """True inside a Jupyter kernel (where a live terminal bar would not render)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
