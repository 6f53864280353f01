"""Output files other than checkpoints (JSON reports): checked before the work, written
atomically, and never over a file that lowbit did not write."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

# Top-level key that marks a JSON file as lowbit's own (the value names what it holds).
MARKER = "lowbit"


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Check, before any long work, that ``path`` can be written; return it.

    It may exist only as a file lowbit wrote (a JSON object with a ``"lowbit"`` key, as
    `write_json` writes); missing folders above it are allowed (created when writing) as long
    as the nearest existing one is a writable directory.

    Raises:
        ValueError: ``path`` is a directory, a folder above it is a file, or it is a file that
            lowbit did not write (``what`` names the option in the message).
        PermissionError: the folder it would be written in is not writable.
    """
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; give a file name")
    if target.exists() and not _is_ours(target):
        raise ValueError(
            f"{what} {str(path)!r} exists and was not written by lowbit; refusing to replace it"
        )
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(folder)!r} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {str(path)!r}: {str(folder)!r} is not writable")
    return target


def write_json(path: str | os.PathLike, kind: str, data: dict) -> Path:
    """Write ``{"lowbit": kind, **data}`` as strict JSON to ``path`` atomically (parents
    created), after the same checks as `check_output_file`."""
    target = check_output_file(path, "output file")
    text = json.dumps({MARKER: kind, **data}, indent=2, allow_nan=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, text + "\n")
    return target


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename:
    readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _is_ours(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get(MARKER), str)
