"""One progress bar for long loops (decoding a split, an epoch): Rich when enabled, else nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(enabled: bool, description: str, total: int,
                 show_loss: bool = False) -> Iterator[Callable[..., None]]:
    """Yield `advance(loss=None)`; a transient bar that leaves no trace in logs once done."""
    if not enabled:
        yield lambda loss=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if show_loss:
        columns.append(TextColumn("loss {task.fields[loss]:.4f}"))
    with Progress(*columns, TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total, loss=float("nan"))

        def advance(loss: float | None = None) -> None:
            bar.update(task, advance=1, **({} if loss is None else {"loss": loss}))

        yield advance
