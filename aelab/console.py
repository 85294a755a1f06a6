"""Terminal output (rich): a live progress bar, epoch lines through it, a final metrics table."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
errors = Console(stderr=True)


def live() -> bool:
    """Draw live bars only on a real terminal, and never under CI."""
    return console.is_terminal and not os.environ.get("CI")


@contextmanager
def progress(total_steps: int, completed: int = 0, description: str = "train") -> Iterator["Bar"]:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[losses]}"),
                  console=console, disable=not live(), transient=False) as bar:
        yield Bar(bar, bar.add_task(description, total=total_steps, completed=completed, losses=""))


class Bar:
    def __init__(self, progress: Progress, task):
        self._progress, self._task = progress, task

    def advance(self, steps: int = 1) -> None:
        self._progress.advance(self._task, steps)

    def end_here(self) -> None:
        """Training stopped before the bar's total (early stopping): the bar ends full where it is."""
        self._progress.update(self._task, total=self._progress.tasks[self._task].completed)

    def show(self, terms: dict[str, float]) -> None:
        self._progress.update(self._task, losses=format_terms(terms))

    def log(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)


def format_terms(terms: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4g}" for name, value in terms.items())


def summary(metrics: dict[str, dict[str, float]], title: str) -> None:
    """One row per split, one column per metric name found in any split."""
    columns = list(dict.fromkeys(k for split in metrics.values() for k in split))
    table = Table()
    table.add_column("split")
    for name in columns:
        table.add_column(name, justify="right")
    for split, values in metrics.items():
        table.add_row(split, *(f"{values[c]:.5g}" if c in values else "" for c in columns))
    show(table, title)


def metrics_table(metrics: dict[str, float], title: str) -> None:
    """Two columns, one metric a row, in the order given."""
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.5g}")
    show(table, title)


def show(table: Table, title: str) -> None:
    """A table under its title, the title on a line of its own: a sweep job's long run name folded
    into a narrow table's width was hard to read."""
    console.print(title, style="bold", markup=False, highlight=False, soft_wrap=True)
    console.print(table)


def first_line(error: BaseException) -> str:
    """An exception's first non-blank line (its type's name if it has none), for one-line reports."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def error(message: str) -> None:
    """One line on stderr: what is wrong and how to fix it (printed as written: "aelab[sweep]" is no markup)."""
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.stderr.flush()
