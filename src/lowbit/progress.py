"""Progress for long steps: tqdm bars and one-line status messages, on standard error.

Bars are shown where standard error is a terminal and only once a step has lasted two seconds,
so quick steps and logs stay quiet; ``LOWBIT_PROGRESS=1`` forces them on, ``=0`` off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

DELAY_S = 2.0


def enabled(progress: bool | None = None) -> bool:
    """Whether to show progress: ``progress`` if given, else ``LOWBIT_PROGRESS``, else whether
    standard error is a terminal."""
    if progress is not None:
        return bool(progress)
    forced = os.environ.get("LOWBIT_PROGRESS")
    if forced is not None:
        return forced not in ("", "0", "false", "no")
    return sys.stderr.isatty()


def bar(
    iterable: Iterable,
    desc: str,
    *,
    total: int | None = None,
    unit: str = "it",
    progress: bool | None = None,
):
    """``iterable`` wrapped in a tqdm bar that appears after `DELAY_S` seconds (if enabled)."""
    width, height = _terminal_size()
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        delay=DELAY_S,
        disable=not enabled(progress),
        file=sys.stderr,
        leave=False,
        # A terminal that reports a size of 0 x 0 (a pseudo-terminal nobody sized: `script`,
        # some CI runners and IDE consoles) makes tqdm hide every bar: use a fixed size there.
        dynamic_ncols=width > 0,
        ncols=None if width > 0 else 80,
        nrows=None if height > 0 else 24,
    )


def _terminal_size() -> tuple[int, int]:
    """(columns, lines) of the terminal on standard error; (0, 0) if unknown or none."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return 0, 0
    return size.columns, size.lines


def status(message: str) -> None:
    """Say on standard error what a long step without a bar is doing (always shown: these
    steps take tens of seconds and happen once)."""
    print(f"lowbit: {message}", file=sys.stderr, flush=True)
