"""Atomic saves of model folders: an interrupted save never leaves a half-written model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _is_weights(path: Path) -> bool:
    return path.name.endswith(_WEIGHT_SUFFIXES)


def check_target(target: str | os.PathLike, overwrite: bool) -> Path:
    """The target folder as a Path; raises if it exists and ``overwrite`` is off (call it before long work)."""
    path = Path(target).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose a new folder or allow overwriting it.")
    return path


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success, publish its files at ``target``.

    A missing ``target`` appears by one rename of the whole folder. An existing one (the trainer's
    output folder, which also holds its checkpoints) gets each file by ``os.replace``, weights last,
    and loses the weight files this save did not write (a stale shard index would otherwise win
    over the new weights); anything else in it is kept. Each file is either old or new, never
    partly written. On an exception the staging folder is removed and ``target`` is untouched.
    """
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if not target.exists():
            os.replace(staging, target)
            return
        written = sorted(staging.iterdir(), key=_is_weights)
        for path in written:
            destination = target / path.name
            if destination.is_dir():
                shutil.rmtree(destination)
            os.replace(path, destination)
        names = {path.name for path in written}
        for stale in [path for path in target.iterdir() if _is_weights(path) and path.name not in names]:
            stale.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
