"""Crash-safe writes into a checkpoint directory that may also hold the user's own files.

A save never replaces the directory: it writes every new file into a hidden *stage* folder
inside it (``.lowbit-stage-<pid>-<random>``), writes the stage's manifest last (a stage with a
manifest is complete), then moves the files into place one ``os.replace`` at a time and the
manifest last of all. Files the directory held that lowbit did not write are never touched.

A process killed at any point leaves one of:

* an incomplete stage (no manifest): the checkpoint before the save is intact; the stage is
  removed by the next save or load;
* a complete stage, partly moved: the next save or load finishes the move (rolls forward), so
  the checkpoint is the one the killed save was writing;
* a stage whose manifest has moved: the commit is done; the stage is removed.

A stage is only ever recovered once the process named in it is gone, so a concurrent save is
never disturbed. Checkpoints written by lowbit 0.1 replaced the whole directory through hidden
sibling folders (``.NAME.tmp-*``, ``.NAME.old-*``); `recover` also repairs what a kill left of
that: a missing directory is put back from them, and the siblings are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

STAGE_PREFIX = ".lowbit-stage-"
# Files a stage lists for deletion once it is committed: the previous save's files that the
# new one does not write again (a tokenizer that changed its vocabulary file, say).
OBSOLETE = "lowbit-obsolete.json"
_STAGE_NAME = re.compile(re.escape(STAGE_PREFIX) + r"(\d+)-[0-9a-f]+$")


def new_stage(directory: Path) -> Path:
    """Create and return an empty stage folder inside ``directory`` (which must exist)."""
    stage = directory / f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    stage.mkdir(mode=0o777)
    return stage


def staged_files(stage: Path, manifest_name: str) -> list[str]:
    """Every file written into ``stage`` as sorted POSIX paths relative to it, except the
    manifest and the obsolete list (which the commit handles itself)."""
    files = []
    for root, _dirs, names in os.walk(stage):
        for name in names:
            rel = PurePosixPath(Path(root, name).relative_to(stage).as_posix())
            if str(rel) not in (manifest_name, OBSOLETE):
                files.append(str(rel))
    return sorted(files)


def commit(stage: Path, directory: Path, manifest_name: str) -> None:
    """Move a complete stage's files into ``directory``, delete the files it lists as obsolete,
    move its manifest last, then remove the stage. Idempotent: a commit killed half-way is
    finished by running it again (`recover` does); until the manifest moves, the stage keeps
    its own, so a stage is never left without a record of what is still to do."""
    manifest = json.loads((stage / manifest_name).read_text())
    listed = _listed_files(manifest)
    for rel in listed:
        source = stage / rel
        if source.is_file():
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, directory / rel)
    obsolete = []
    if (stage / OBSOLETE).is_file():
        with contextlib.suppress(ValueError, OSError):
            obsolete = json.loads((stage / OBSOLETE).read_text())
    keep = set(listed) | {manifest_name}
    for rel in obsolete if isinstance(obsolete, list) else []:
        if isinstance(rel, str) and rel not in keep and _is_plain_relative(rel):
            with contextlib.suppress(OSError):
                (directory / rel).unlink()
    os.replace(stage / manifest_name, directory / manifest_name)
    shutil.rmtree(stage, ignore_errors=True)


def recover(directory: Path, manifest_name: str) -> None:
    """Finish or clean up what killed saves left in (or beside) ``directory``.

    Complete stages of processes that are gone are committed, oldest manifest first (so the
    newest save wins); incomplete ones are removed. Never raises for a directory it cannot
    write: recovery is best effort, and loading then checks what is there.
    """
    _recover_legacy_siblings(directory, manifest_name)
    if not directory.is_dir():
        return
    complete, incomplete = [], []
    for stage in _stages(directory):
        if _alive(stage):
            continue
        manifest = stage / manifest_name
        (complete if manifest.is_file() else incomplete).append(stage)
    complete.sort(key=lambda s: (s / manifest_name).stat().st_mtime_ns)
    for stage in complete:
        try:
            commit(stage, directory, manifest_name)
        except (OSError, ValueError):
            # Unreadable or unwritable: leave it for an operator rather than guess.
            continue
    for stage in incomplete:
        shutil.rmtree(stage, ignore_errors=True)


def only_stages(directory: Path) -> bool:
    """Whether ``directory`` holds nothing but stage folders (a first save that was killed)."""
    return all(_STAGE_NAME.match(p.name) for p in directory.iterdir())


def _stages(directory: Path) -> Iterable[Path]:
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            if _STAGE_NAME.match(path.name) and path.is_dir() and not path.is_symlink():
                yield path


def _alive(stage: Path) -> bool:
    """Whether the process that created ``stage`` still runs (then it is not ours to touch)."""
    pid = int(_STAGE_NAME.match(stage.name).group(1))
    if pid == os.getpid():
        return False  # our own leftover (an earlier save of this process was interrupted)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _listed_files(manifest: dict) -> list[str]:
    """The manifest's ``files`` entry, keeping only plain relative paths (never ``..``)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        return []
    return [f for f in files if isinstance(f, str) and _is_plain_relative(f)]


def _is_plain_relative(rel: str) -> bool:
    path = PurePosixPath(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts and "\\" not in rel


def _recover_legacy_siblings(directory: Path, manifest_name: str) -> None:
    """Repair a lowbit 0.1 directory swap killed between its two renames, then remove the
    hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings it leaves (they are lowbit's by name)."""
    parent = directory.parent
    if not parent.is_dir():
        return
    pattern = re.compile(re.escape(f".{directory.name}.") + r"(tmp|old)-[A-Za-z0-9_]+$")
    leftovers = {"tmp": [], "old": []}
    with contextlib.suppress(OSError):
        for path in parent.iterdir():
            match = pattern.match(path.name)
            if match and path.is_dir() and not path.is_symlink():
                leftovers[match.group(1)].append(path)
    if not leftovers["tmp"] and not leftovers["old"]:
        return
    if not directory.exists() and not directory.is_symlink():
        # The new copy (tmp) was complete before the swap began; the old one is the fallback.
        for candidate in leftovers["tmp"] + leftovers["old"]:
            if (candidate / manifest_name).is_file():
                with contextlib.suppress(OSError):
                    os.replace(candidate, directory)
                    break
    if directory.is_dir():
        for path in leftovers["tmp"] + leftovers["old"]:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
