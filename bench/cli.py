"""What the bench programs share: a command line with the console its figures go to, and the table they
print them in. Each program keeps its own parameters and measurements; only their presentation is here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from cyclopts import App
from rich.console import Console
from rich.table import Table


def bench_app(name: str, doc: str | None, *, width: int | None = None) -> tuple[App, Console]:
    """A bench program's cyclopts app (help from its module's `doc`) and the console both print to; a fixed
    `width` keeps wide tables on one line when the output goes to a file or a pipe."""
    console = Console(width=width)
    return App(name=name, help=doc, console=console), console


def figures(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    justify: Literal["left", "right"] = "right",
) -> Table:
    """A table of figures: one column per name in `columns` (numbers read best right-aligned), `rows` as given."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(*row)
    return table
