"""Crash-consistent saves of model folders: a kill at any instant never leaves a folder that loads as a mix.

A save writes the new model into a staging folder beside the target. A missing target appears by one
rename of that folder. An existing one (the trainer's output folder, which also holds checkpoints and
logs) cannot take several files at once, so it is published in three moves:

1. the staging folder, complete and flushed to disk, is renamed into the target as ``.seft-incoming``:
   one atomic rename, after which the new model exists whole on disk and publication only rolls forward;
2. the previous model's ``config.json`` is removed first, so that no loader opens the folder while it
   holds parts of two models, then the previous model's files that the new one does not replace;
3. the new files move in one by one (``os.replace``, atomic per file), the manifest and ``config.json``
   last, and ``.seft-incoming`` is removed.

A kill inside moves 2-3 leaves a folder without ``config.json`` (``from_pretrained`` refuses it) with
``.seft-incoming`` in it. `complete_publication` finishes the moves: the next save into the folder runs
it, as does every seft_trl command that reads a model folder (``seft-trl report``, ``prune``,
``repair``); by hand, ``python -c "from seft_trl.saving import complete_publication as c; c('FOLDER')"``.
The manifest ``.seft-files.json`` lists the published model's entries, so the next save replaces
exactly those and nothing else the folder holds. Staging folders of saves killed before move 1 are
removed by the next save to the same target (one save at a time per target, as the Trainer does).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

INCOMING = ".seft-incoming"
MANIFEST = ".seft-files.json"
CONFIG = "config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _is_weights(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def check_target(target: str | os.PathLike, overwrite: bool) -> Path:
    """The target folder as a Path; raises if it exists and ``overwrite`` is off (call it before long work)."""
    path = Path(target).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose a new folder or allow overwriting it.")
    return path


def _entries(folder: Path) -> list[str] | None:
    """The top-level entries of the model last published in ``folder`` (its manifest); None without one."""
    try:
        names = json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return [name for name in names if isinstance(name, str)] if isinstance(names, list) else None


def published_files(folder: str | os.PathLike) -> list[str]:
    """The files (relative paths) of the model last published in ``folder``; empty for a folder without a manifest.

    What an upload of that save should take: the folder usually holds checkpoints and logs as well.
    """
    folder = Path(folder).expanduser()
    files = []
    for name in _entries(folder) or []:
        path = folder / name
        files += [p.relative_to(folder).as_posix() for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()]
    return sorted(files)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _flush(folder: Path) -> None:
    """fsync every file of ``folder`` and the folder itself, so that a rename never publishes unwritten data."""
    for path in (*sorted(p for p in folder.rglob("*") if p.is_file()), folder):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _publication_order(path: Path) -> tuple[bool, bool]:
    """Data first, then the manifest (its arrival says move 2 is over), ``config.json`` last (the folder loads again)."""
    return path.name == CONFIG, path.name == MANIFEST


def complete_publication(folder: str | os.PathLike) -> bool:
    """Finish a publication into ``folder`` that a kill interrupted (moves 2-3 above); True if there was one.

    Idempotent, and safe to run at any point of an interrupted run of itself.
    """
    folder = Path(folder).expanduser()
    incoming = folder / INCOMING
    if not incoming.is_dir():
        return False
    new = _entries(incoming)
    if new is not None:  # its manifest has not moved in yet: the previous model's files may still be there
        old = _entries(folder)
        if old is None:  # a folder saved before manifests: its weight files (stale shards would shadow new ones)
            old = [path.name for path in folder.iterdir() if _is_weights(path.name)]
        for name in [CONFIG, *sorted(set(old) - set(new) - {CONFIG, MANIFEST, INCOMING})]:
            if "/" not in name and name not in ("", ".", ".."):
                _remove(folder / name)
    for path in sorted(incoming.iterdir(), key=_publication_order):
        destination = folder / path.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(path, destination)
    incoming.rmdir()
    return True


def _remove_stale_staging(target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success, publish its entries at ``target``.

    See the module docstring for what a kill at any instant leaves. On an exception the staging
    folder is removed and ``target`` is untouched.
    """
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        complete_publication(target)
    _remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        (staging / MANIFEST).write_text(json.dumps(sorted(p.name for p in staging.iterdir() if p.name != MANIFEST)))
        _flush(staging)
        if not target.exists():
            os.replace(staging, target)
            return
        os.replace(staging, target / INCOMING)
        complete_publication(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def file_damage(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a whole file of its kind (truncated, unparsable), or None when it looks whole.

    Checks that read no tensor: a torch file (``.pt``, ``.pth``, ``.bin`` in torch's zip format) keeps
    its directory at its end, so a truncated one has none; a safetensors file declares in its header
    how long it is; JSON parses. Other files (and torch's legacy pickles) are not judged.
    """
    path = Path(path)
    try:
        if path.name.endswith((".pt", ".pth", ".bin")):
            with open(path, "rb") as file:
                if file.read(2) == b"PK" and not zipfile.is_zipfile(path):
                    return "an incomplete torch archive (truncated)"
        elif path.name.endswith(".safetensors"):
            size = path.stat().st_size
            with open(path, "rb") as file:
                head = file.read(8)
                length = int.from_bytes(head, "little") if len(head) == 8 else size
                if length > size - 8:
                    return f"{size:,} bytes, shorter than its own header says (truncated)"
                header = json.loads(file.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
            if size < 8 + length + end:
                return f"{size:,} bytes where its header promises {8 + length + end:,} (truncated)"
        elif path.name.endswith(".json"):
            json.loads(path.read_text())
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        return f"unreadable ({type(error).__name__}: {error})"
    return None


def save_checkpoint(
    model: nn.Module,
    tokenizer,
    target: str | os.PathLike,
    extra_files: dict[str, dict | str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save a plain HF checkpoint (safetensors), its tokenizer and extra files, atomically.

    ``extra_files``: file name → content; a dict is written as JSON, a str as it is (a model card).
    """
    with atomic_directory(target) as folder:
        model.save_pretrained(folder, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        for name, content in (extra_files or {}).items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
            (folder / name).write_text(text)
    return Path(target).expanduser()
