"""Which periodic checkpoint a run resumes from, and whether its files are whole.

transformers writes a checkpoint's ``trainer_state.json`` last, so a folder without a readable one
is a save a kill interrupted: ``resume_from_checkpoint=True`` passes over it (with a warning that
names it) to the newest complete one, where transformers would take the newest folder and stop on
the missing file. A complete checkpoint whose files were truncated afterwards (a full disk, a
partial copy) is refused before training with the file named, instead of an ``OSError`` from deep
inside ``torch.load``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..saving import file_damage

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete(folder: Path) -> bool:
    """Whether the checkpoint's save finished: its trainer state, written last, is there and parses."""
    try:
        json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` folder of ``output_dir`` (None if none), warning about newer incomplete ones."""
    folder = Path(output_dir).expanduser()
    found = sorted(((int(match.group(1)), path) for path in (folder.iterdir() if folder.is_dir() else ())
                    if path.is_dir() and (match := _CHECKPOINT.match(path.name))), reverse=True)
    skipped = []
    for _, path in found:
        if is_complete(path):
            if skipped:
                warnings.warn(
                    f"Skipped {len(skipped)} incomplete checkpoint(s) without a readable {TRAINER_STATE} (a save "
                    f"interrupted by a kill): {', '.join(skipped)}. Resuming from {path}; delete the skipped "
                    "folder(s) once you no longer need them.", stacklevel=3)
            return str(path)
        skipped.append(str(path))
    return None


def check_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Refuse a checkpoint with a truncated or unparsable file, naming it and what to do."""
    folder = Path(checkpoint).expanduser()
    if not folder.is_dir():
        raise ValueError(f"The checkpoint to resume from, {folder}, does not exist or is not a folder.")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        reason = file_damage(path)
        if reason is not None:
            raise ValueError(
                f"{path} is damaged: {reason}. The checkpoint {folder} cannot be resumed. Resume from an earlier "
                f"checkpoint (pass its folder as resume_from_checkpoint, or delete {folder} and pass True), or start "
                "over."
            )
