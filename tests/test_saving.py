"""Atomic saves: nothing half-written, stale weights never shadow new ones, other content kept."""

from __future__ import annotations

import pytest

from seft_trl.saving import atomic_directory, check_target


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
    assert sorted(p.name for p in target.iterdir()) == ["checkpoint-10", "config.json", "model.safetensors"]
    assert (target / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_check_target_refuses_an_existing_folder_without_overwrite(tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        check_target(tmp_path, overwrite=False)
    assert check_target(tmp_path, overwrite=True) == tmp_path
