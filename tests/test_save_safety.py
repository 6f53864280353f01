"""`save` never loses a user's file and survives being killed at any point.

The kill tests fork a child that saves and dies without cleaning up (``os._exit`` at a chosen
step of the commit, or SIGKILL at a random moment); the next save or load must then find a
whole checkpoint (the old one or the new one, never a mix, never an empty name) and every file
the user put there.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantSpec, quantize_model
from lowbit.io import read_manifest, staging

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

X = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))


def build(seed: int, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 64)).eval()
    quantize_model(model, QuantSpec(bits=4, group_size=32), progress=False)
    return model


def skeleton(width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 64)).eval()


def output(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(X)


MODELS = {"A": build(1), "B": build(2), "C": build(3)}
OUTPUTS = {name: output(model) for name, model in MODELS.items()}


def extras(which: str):
    """Each version writes a config naming itself; only B writes merges.txt (so saving A after
    B leaves B's merges.txt obsolete, to be removed)."""

    def write(folder):
        (folder / "config.json").write_text(json.dumps({"which": which}))
        (folder / "tok").mkdir()
        (folder / "tok" / "vocab.txt").write_text(which * 100)
        if which == "B":
            (folder / "merges.txt").write_text("b")

    return write


def save_version(which: str, directory) -> None:
    lowbit.save(
        MODELS[which], directory, metadata={"which": which}, write_extra=extras(which)
    )


def check_whole(directory, allowed: set[str]) -> str:
    """Load ``directory`` and return which version it holds, checking that the tensors, the
    manifest and the extra files all belong to that one version."""
    which = read_manifest(directory)["metadata"]["which"]
    assert which in allowed
    model = lowbit.load(directory, skeleton())
    assert torch.equal(output(model), OUTPUTS[which])
    assert json.loads((directory / "config.json").read_text()) == {"which": which}
    assert (directory / "tok" / "vocab.txt").read_text() == which * 100
    return which


def leftovers(directory) -> list[str]:
    inside = [p.name for p in directory.iterdir() if p.name.startswith(staging.STAGE_PREFIX)]
    beside = [p.name for p in directory.parent.iterdir() if p.name != directory.name]
    return inside + beside


def in_child(action) -> int:
    """Run ``action`` in a forked child; return its exit status (9: it 'died')."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            action()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# Files the user put in the folder


def test_user_files_survive_a_resave(tmp_path):
    out = tmp_path / "r1"
    save_version("A", out)
    (out / "NOTES.md").write_text("notes")
    (out / "report.json").write_text("{}")
    (out / "evals").mkdir()
    (out / "evals" / "eval.json").write_text("[1]")
    save_version("B", out)
    save_version("A", out)
    assert (out / "NOTES.md").read_text() == "notes"
    assert (out / "report.json").read_text() == "{}"
    assert (out / "evals" / "eval.json").read_text() == "[1]"
    assert check_whole(out, {"A"}) == "A"
    assert not (out / "merges.txt").exists()  # B's own file, obsolete once A is saved again
    assert leftovers(out) == []


def test_manifest_lists_the_files_lowbit_wrote(tmp_path):
    save_version("B", tmp_path / "m")
    files = read_manifest(tmp_path / "m")["files"]
    assert files == ["config.json", "merges.txt", "model.safetensors", "tok/vocab.txt"]


def test_an_extra_that_would_replace_a_user_file_is_refused(tmp_path):
    out = tmp_path / "r"
    save_version("A", out)
    (out / "merges.txt").write_text("the user's")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="merges.txt"):
        save_version("B", out)
    assert (out / "merges.txt").read_text() == "the user's"
    assert sorted(p.name for p in out.iterdir()) == before
    assert check_whole(out, {"A"}) == "A"


def test_a_legacy_checkpoint_keeps_the_users_files(tmp_path):
    """Checkpoints of lowbit 0.1 list no files: every file may be overwritten, none deleted."""
    out = tmp_path / "old"
    save_version("B", out)
    manifest = json.loads((out / "lowbit.json").read_text())
    del manifest["files"]
    (out / "lowbit.json").write_text(json.dumps(manifest))
    (out / "NOTES.md").write_text("keep")
    save_version("A", out)
    assert (out / "NOTES.md").read_text() == "keep"
    assert (out / "merges.txt").exists()  # not known to be lowbit's: kept
    assert check_whole(out, {"A"}) == "A"


def test_saving_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    save_version("A", real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    save_version("B", link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert check_whole(real, {"B"}) == "B"
    assert check_whole(link, {"B"}) == "B"


def test_a_dangling_symlink_is_an_error(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="symlink"):
        save_version("A", link)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_metadata_must_be_strict_json(tmp_path):
    with pytest.raises(ValueError, match="metadata"):
        lowbit.save(MODELS["A"], tmp_path / "x", metadata={"x": float("nan")})
    with pytest.raises(ValueError, match="metadata"):
        lowbit.save(MODELS["A"], tmp_path / "x", metadata={"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_meta_tensors_are_refused_before_writing(tmp_path):
    with torch.device("meta"):
        model = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="meta"):
        lowbit.save(model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_the_path_is_refused_up_front(tmp_path):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(ValueError, match="not a directory"):
        lowbit.io.checkpoint.check_save_target(tmp_path / "file" / "out")
    assert (tmp_path / "file").read_text() == "keep"


def test_an_unwritable_parent_is_refused_up_front(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="not writable"):
        lowbit.io.checkpoint.check_save_target(locked / "out")


# Recovery from killed saves


def test_legacy_swap_killed_between_its_renames_is_put_back(tmp_path):
    """lowbit 0.1 moved the old folder aside, then the new one in: a kill in between left
    no checkpoint, only hidden siblings."""
    out = tmp_path / "ckpt"
    save_version("A", out)
    os.replace(out, tmp_path / ".ckpt.old-x1y2")
    save_version("B", tmp_path / "elsewhere")
    os.replace(tmp_path / "elsewhere", tmp_path / ".ckpt.tmp-a9b8")
    assert check_whole(out, {"B"}) == "B"  # loading recovers the newer, complete copy
    assert leftovers(out) == []


def test_legacy_half_written_tmp_is_removed(tmp_path):
    out = tmp_path / "ckpt"
    save_version("A", out)
    half = tmp_path / ".ckpt.tmp-k3j4"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 1000)
    save_version("B", out)
    assert leftovers(out) == []
    assert check_whole(out, {"B"}) == "B"


@pytest.mark.parametrize("step", range(8))
def test_killed_at_each_step_of_the_commit(tmp_path, step, monkeypatch):
    """The child dies (no cleanup runs) just before its ``step``-th rename; the next load sees
    the old or the new checkpoint whole, and the next save works and leaves nothing behind."""
    out = tmp_path / "ckpt"
    save_version("B", out)
    (out / "NOTES.md").write_text("mine")
    calls = []
    real_replace = os.replace

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) > step:
            os._exit(9)
        real_replace(src, dst)

    def child():
        monkeypatch.setattr(staging.os, "replace", dying_replace)
        monkeypatch.setattr(lowbit.io.checkpoint.os, "replace", dying_replace)
        save_version("A", out)

    code = in_child(child)
    assert code in (0, 9)
    which = check_whole(out, {"A", "B"})
    if code == 9:
        # Before the stage's manifest exists nothing has moved: still B. After it, A.
        assert which == ("B" if step == 0 else "A")
    assert (out / "NOTES.md").read_text() == "mine"
    assert leftovers(out) == []
    save_version("C", out)
    assert check_whole(out, {"C"}) == "C"
    assert (out / "NOTES.md").read_text() == "mine"
    assert not (out / "merges.txt").exists()
    assert leftovers(out) == []


@pytest.mark.parametrize("complete", [False, True])
def test_killed_first_save_is_finished_or_cleaned(tmp_path, monkeypatch, complete):
    """Killed while writing the stage's manifest (incomplete: the next save or load removes the
    stage) or just before moving it into place (complete: loading rolls it forward)."""
    out = tmp_path / "new"
    real_replace = os.replace
    fatal = out / "lowbit.json"

    def die(src, dst):
        if Path(dst) == fatal or (not complete and Path(dst).name == "lowbit.json"):
            os._exit(9)
        real_replace(src, dst)

    def child():
        monkeypatch.setattr(staging.os, "replace", die)
        monkeypatch.setattr(lowbit.io.checkpoint.os, "replace", die)
        save_version("A", out)

    assert in_child(child) == 9
    assert not fatal.exists()
    if complete:
        assert check_whole(out, {"A"}) == "A"
    else:
        with pytest.raises(FileNotFoundError, match="no lowbit manifest"):
            read_manifest(out)
        assert list(out.iterdir()) == []
        save_version("A", out)
        assert check_whole(out, {"A"}) == "A"
    assert leftovers(out) == []


def test_sigkill_at_random_moments(tmp_path):
    """A child saving in a loop is SIGKILLed at random moments; after each kill the folder
    holds a whole checkpoint and the user's file, and the next save cleans everything up."""
    out = tmp_path / "ckpt"
    save_version("B", out)
    (out / "NOTES.md").write_text("mine")
    rng = random.Random(13)
    seen = set()
    for _ in range(12):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                while True:
                    for which in ("A", "B"):
                        save_version(which, out)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.add(check_whole(out, {"A", "B"}))
        assert (out / "NOTES.md").read_text() == "mine"
        assert leftovers(out) == []
    save_version("C", out)
    assert check_whole(out, {"C"}) == "C"
    assert sorted(p.name for p in out.iterdir()) == [
        "NOTES.md",
        "config.json",
        "lowbit.json",
        "model.safetensors",
        "tok",
    ]
    assert seen  # at least one kill landed after a save completed or rolled forward
