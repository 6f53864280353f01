"""Progress bars: shown on a terminal after two seconds, also on one that reports no size."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys

import pytest

from lowbit import progress


def test_enabled_follows_the_argument_then_the_environment_then_the_terminal(monkeypatch):
    monkeypatch.delenv("LOWBIT_PROGRESS", raising=False)
    assert progress.enabled(True) and not progress.enabled(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.enabled()  # not a terminal
    monkeypatch.setenv("LOWBIT_PROGRESS", "1")
    assert progress.enabled() and not progress.enabled(False)
    monkeypatch.setenv("LOWBIT_PROGRESS", "0")
    assert not progress.enabled()


def test_a_disabled_bar_prints_nothing(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    assert list(progress.bar(range(5), "work", progress=False)) == [0, 1, 2, 3, 4]
    assert err.getvalue() == ""


def test_bars_show_on_a_terminal_that_reports_no_size():
    # A pseudo-terminal nobody sized reports 0 x 0 (so did the `script` run of `make demo`):
    # tqdm then hid every bar. The child's standard error is such a terminal.
    master, slave = pty.openpty()
    code = (
        "import time\n"
        "from lowbit import progress\n"
        "progress.DELAY_S = 0.2\n"
        "for _ in progress.bar(range(6), 'calibrating', unit='batch'):\n"
        "    time.sleep(0.1)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stderr=slave,
        env={k: v for k, v in os.environ.items() if k != "LOWBIT_PROGRESS"},
    )
    os.close(slave)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
        assert child.wait(timeout=30) == 0
    assert b"calibrating:" in output and b"batch" in output


@pytest.mark.parametrize("size", [(0, 0), (120, 40)])
def test_terminal_size_fallback(monkeypatch, size):
    monkeypatch.setattr(os, "get_terminal_size", lambda fd: os.terminal_size(size))
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    assert progress._terminal_size() == size
    bar = progress.bar(range(3), "x", progress=True)
    if size == (0, 0):
        assert (bar.ncols, bar.nrows) == (80, 24)
    else:
        assert bar.ncols in (size[0] - 1, size[0])  # sized by the terminal, as tqdm does
    bar.close()
