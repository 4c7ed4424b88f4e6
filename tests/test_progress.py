"""Progress display: plain, timed lines when the stream is not a terminal; nothing when disabled."""

from __future__ import annotations

import io

import pytest

import xraylens.progress as progress_mod
from xraylens.progress import progress_bar


class _Clock:
    """A fake monotonic clock: each reading returns the current value; tests move it on by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(progress_mod, "_clock", c)
    return c


def test_plain_lines_every_ten_percent_with_rate_eta_and_loss(clock):
    out = io.StringIO()  # not a TTY, as in CI logs or under nohup
    with progress_bar(True, "epoch 1/3", total=200, show_loss=True, unit="img", stream=out) as advance:
        for step in range(25):  # 25 batches of 8 images, one second each
            clock.t += 1.0
            advance(0.5 if step < 3 else 0.25, n=8)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 10 %, 20 %, ... 100 %: no blank lines, no bar redraws
    assert lines[0] == "epoch 1/3: 24/200 (12%) 8.00 img/s, elapsed 0:03, left 0:22, loss 0.5000"
    # the loss is the mean since the previous line: steps 4 and 5 both had 0.25
    assert lines[1] == "epoch 1/3: 40/200 (20%) 8.00 img/s, elapsed 0:05, left 0:20, loss 0.2500"
    assert lines[-1] == "epoch 1/3: 200/200 (100%) 8.00 img/s, elapsed 0:25, loss 0.2500"


def test_plain_lines_at_least_every_30_seconds(clock):
    out = io.StringIO()
    with progress_bar(True, "decoding train", total=1000, stream=out) as advance:
        for _ in range(3):
            clock.t += 20.0  # slow: 1 item per 20 s, far from the next 10 %
            advance()
    lines = out.getvalue().splitlines()
    # a line after 40 s (30 s since the start had passed), then the closing line at 60 s
    assert lines == [
        "decoding train: 2/1000 (0%) 0.05 it/s, elapsed 0:40, left 5:32:40",
        "decoding train: 3/1000 (0%) 0.05 it/s, elapsed 1:00, left 5:32:20",
    ]


def test_old_call_forms_still_work(clock):
    out = io.StringIO()
    with progress_bar(True, "x", total=2, show_loss=True, stream=out) as advance:
        clock.t += 1.0
        advance()  # the decoder's form
        clock.t += 1.0
        advance(0.75)  # the training loop's form: loss only, one step
    assert out.getvalue().splitlines()[-1] == "x: 2/2 (100%) 1.00 it/s, elapsed 0:02, loss 0.7500"


def test_a_crash_leaves_no_closing_line(clock):
    out = io.StringIO()
    with pytest.raises(RuntimeError), progress_bar(True, "x", total=100, stream=out) as advance:
        advance()
        raise RuntimeError("boom")
    assert out.getvalue() == ""


def test_disabled_prints_nothing(capsys):
    with progress_bar(False, "x", total=3, show_loss=True) as advance:
        advance()
        advance(0.1)
        advance(None, n=4)
    assert capsys.readouterr() == ("", "")


def test_default_stream_is_stderr(capsys, clock):
    # pytest's capture stream is not a terminal, so this is the plain path; stdout stays clean
    with progress_bar(True, "x", total=1) as advance:
        clock.t += 3.0
        advance()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("x: 1/1 (100%)")


def test_short_tasks_write_nothing(capsys, clock):
    # a cached split or a tiny epoch done within QUIET_S leaves the log alone
    with progress_bar(True, "decoding val", total=60) as advance:
        for _ in range(60):
            clock.t += 0.01
            advance()
    assert capsys.readouterr() == ("", "")


def test_terminal_gets_the_rich_bar(monkeypatch, clock):
    class _Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = _Tty()
    with progress_bar(True, "x", total=4, show_loss=True, stream=out) as advance:
        advance(0.5, n=2)
        advance(n=2)
    assert "x: " not in out.getvalue()  # no plain lines on a terminal
