"""One progress display for long loops (decoding a split, an epoch).

On a terminal: a transient Rich bar that leaves no trace once done. Anywhere else (CI logs, ``nohup``,
a pipe, a notebook's stderr): plain lines, one each time another ``LOG_EVERY_PCT`` percent is done, or
``LOG_EVERY_S`` seconds passed since the last line if that comes sooner, and one at the end, e.g.

    epoch 1/5: 480/1200 (40%) 81.3 img/s, elapsed 0:05, left 0:08, loss 0.4321

(the loss on a plain line is the mean of the values passed since the previous line). Disabled: nothing.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

LOG_EVERY_PCT = 10.0
LOG_EVERY_S = 30.0
# a task shorter than this writes nothing (decoding a cached split, a tiny epoch): logs stay readable
QUIET_S = 2.0

# the clock of the plain lines; tests replace it to get deterministic rates and times
_clock: Callable[[], float] = time.monotonic


@contextmanager
def progress_bar(
    enabled: bool,
    description: str,
    total: int,
    show_loss: bool = False,
    *,
    unit: str = "it",
    stream: TextIO | None = None,
) -> Iterator[Callable[..., None]]:
    """Yield ``advance(loss=None, n=1)``: call it after each step with ``n`` items done (images of a batch).

    ``total`` counts the same items as ``n``; ``unit`` names them in the rate ("img" -> "img/s").
    ``stream`` defaults to ``sys.stderr`` at call time; a Rich bar when it is a terminal, plain lines
    otherwise (see the module docstring).
    """
    if not enabled:
        yield lambda loss=None, n=1: None
        return
    out = stream if stream is not None else sys.stderr
    if _is_tty(out):
        with _rich(out, description, total, show_loss) as advance:
            yield advance
    else:
        plain = _PlainProgress(out, description, total, show_loss, unit)
        yield plain.advance
        plain.finish()  # not reached when the loop raised: a crash leaves no misleading "done" line


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@contextmanager
def _rich(stream: TextIO, description: str, total: int, show_loss: bool) -> Iterator[Callable[..., None]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if show_loss:
        columns.append(TextColumn("loss {task.fields[loss]:.4f}"))
    with Progress(*columns, TimeRemainingColumn(), transient=True, console=Console(file=stream)) as bar:
        task = bar.add_task(description, total=total, loss=float("nan"))

        def advance(loss: float | None = None, n: int = 1) -> None:
            bar.update(task, advance=n, **({} if loss is None else {"loss": loss}))

        yield advance


class _PlainProgress:
    """Counts items and writes a line at each LOG_EVERY_PCT step or after LOG_EVERY_S seconds."""

    def __init__(self, stream: TextIO, description: str, total: int, show_loss: bool, unit: str) -> None:
        self.stream, self.description, self.total = stream, description, max(0, int(total))
        self.show_loss, self.unit = show_loss, unit
        self.done = 0
        self.start = self.last_time = _clock()
        self.last_done = 0
        self.next_pct = LOG_EVERY_PCT
        self.loss_sum, self.loss_n = 0.0, 0

    def advance(self, loss: float | None = None, n: int = 1) -> None:
        self.done += n
        if loss is not None:
            self.loss_sum, self.loss_n = self.loss_sum + float(loss), self.loss_n + 1
        now = _clock()
        pct = 100.0 * self.done / self.total if self.total else 0.0
        if now - self.start < QUIET_S:
            return
        if pct >= self.next_pct or now - self.last_time >= LOG_EVERY_S:
            self._line(now)
            # the next percent step above where we are (a big `n` may jump several steps at once)
            self.next_pct = (math.floor(pct / LOG_EVERY_PCT) + 1) * LOG_EVERY_PCT

    def finish(self) -> None:
        if self.done != self.last_done and (self.last_done or _clock() - self.start >= QUIET_S):
            self._line(_clock())

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        parts = [f"{self.description}: {self.done}/{self.total}"]
        if self.total:
            parts[0] += f" ({100.0 * self.done / self.total:.0f}%)"
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        text = f"{' '.join(parts)} {_rate(rate)} {self.unit}/s, elapsed {_hms(elapsed)}"
        if self.total and self.done < self.total and rate > 0:
            text += f", left {_hms((self.total - self.done) / rate)}"
        if self.show_loss and self.loss_n:
            text += f", loss {self.loss_sum / self.loss_n:.4f}"
        print(text, file=self.stream, flush=True)
        self.last_time, self.last_done = now, self.done
        self.loss_sum, self.loss_n = 0.0, 0


def _rate(r: float) -> str:
    if not math.isfinite(r):
        return "-"
    return f"{r:.2f}" if r < 10 else f"{r:.1f}" if r < 100 else f"{r:.0f}"


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
