"""Atomic writes of model folders: an interrupted save never leaves a half-written file."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Written last when files are moved into an existing folder, so that a folder whose weights are
# new also has the new config and tokenizer.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json.index")


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success move its content into ``target``.

    A missing ``target`` is created by one rename of the whole folder. An existing one (the
    trainer's output folder, which also holds checkpoints) gets each new file by ``os.replace``,
    weights last: every file is either the old or the new one, never a partial write.
    On an exception the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if not target.exists():
            os.replace(staging, target)
            return
        files = sorted(staging.iterdir(), key=lambda path: path.name.endswith(_WEIGHT_SUFFIXES))
        for path in files:
            destination = target / path.name
            if destination.is_dir():
                shutil.rmtree(destination)
            os.replace(path, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
