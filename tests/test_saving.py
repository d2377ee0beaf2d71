"""Atomic saves: nothing half-written, stale weights never shadow new ones, other content kept."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from seft_trl.saving import atomic_directory, check_target, complete_publication
from seft_trl.testing import tiny_model


def test_failure_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as folder:
            (folder / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_new_folder_then_existing_folder(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as folder:
        (folder / "model-00001-of-00002.safetensors").write_text("old shard")
        (folder / "model.safetensors.index.json").write_text("old index")
        (folder / "config.json").write_text("old")
    (target / "checkpoint-10").mkdir()  # what a trainer's output folder also holds
    with atomic_directory(target) as folder:
        (folder / "model.safetensors").write_text("new")
        (folder / "config.json").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [".seft-files.json", "checkpoint-10", "config.json",
                                                         "model.safetensors"]
    assert (target / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_check_target_refuses_an_existing_folder_without_overwrite(tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        check_target(tmp_path, overwrite=False)
    assert check_target(tmp_path, overwrite=True) == tmp_path


# ---------------------------------------------------------------------------------------- kills at every event
def model_files(folder: Path) -> dict[str, bytes]:
    """The folder's model content (what a loader reads): every file but the trainer's other entries."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).as_posix().startswith(("checkpoint-", ".seft", "runs/"))}


def killed_at(event: int, save) -> bool:
    """Run ``save`` in a forked child that dies, like a SIGKILL (no cleanup runs), just before its ``event``-th
    file-system change; True if it died, False if the save finished with fewer events."""
    pid = os.fork()
    if pid == 0:  # the child: count every change to the file system and die at the chosen one
        count = itertools.count()

        def dying(function):
            def wrapped(*args, **kwargs):
                if next(count) == event:
                    os._exit(137)
                return function(*args, **kwargs)
            return wrapped

        for name in ("replace", "rename", "unlink", "rmdir", "mkdir", "fsync"):
            setattr(os, name, dying(getattr(os, name)))
        shutil.rmtree = dying(shutil.rmtree)
        try:
            save()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 137


@pytest.mark.parametrize("shards", ["one file, then sharded", "sharded, then one file"])
def test_a_kill_at_any_event_of_a_save_into_an_existing_folder_leaves_the_old_model_or_the_new_one(tmp_path, shards):
    old_model, new_model = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        for parameter in new_model.parameters():
            parameter.add_(1.0)
    old_shard, new_shard = ("10GB", "40KB") if shards.startswith("one") else ("40KB", "10GB")

    def save(model, shard, target):
        with atomic_directory(target) as staging:
            model.save_pretrained(staging, max_shard_size=shard)
            (staging / "sparsity_report.json").write_text(json.dumps({"model": shard}))

    reference = tmp_path / "reference"
    save(old_model, old_shard, reference / "old")
    save(new_model, new_shard, reference / "new")
    old, new = model_files(reference / "old"), model_files(reference / "new")
    assert len([name for name in new if name.endswith(".safetensors")]) + len(
        [name for name in old if name.endswith(".safetensors")]) > 2  # one of them is sharded

    outcomes = set()
    for event in itertools.count():
        target = tmp_path / f"run{event}" / "out"
        save(old_model, old_shard, target)
        (target / "checkpoint-10").mkdir()  # what a trainer's output folder also holds
        (target / "checkpoint-10" / "trainer_state.json").write_text("{}")
        if not killed_at(event, lambda: save(new_model, new_shard, target)):
            assert model_files(target) == new
            break
        seen = model_files(target)
        if (target / "config.json").exists():  # loadable: then wholly one model
            assert seen in (old, new), f"kill at event {event} left a loadable mix"
            outcomes.add("old" if seen == old else "new")
        else:
            assert (target / ".seft-incoming").is_dir(), f"kill at event {event}: unloadable and nothing to finish"
            outcomes.add("unloadable")
        complete_publication(target)  # what the next save or seft_trl command does first
        assert model_files(target) in (old, new), f"kill at event {event}: not one model after completion"
        assert (target / "checkpoint-10" / "trainer_state.json").read_text() == "{}"
        save(old_model, old_shard, target)  # the next save cleans up whatever the kill left
        assert model_files(target) == old
        assert [p.name for p in target.parent.iterdir()] == ["out"] and not (target / ".seft-incoming").exists()
    assert event > 10 and outcomes == {"old", "new", "unloadable"}
