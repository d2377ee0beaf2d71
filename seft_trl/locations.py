"""Where a model named on the command line or in a config lives: a local folder, or a hub repository id.

transformers reads any name that is not an existing folder as a hub id, so a mistyped local path
surfaces as a hub error ("Repo id must be in the form 'repo_name'", or a connection failure when
offline) that never says the folder is missing. These checks say it first, before anything loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .saving import complete_publication

# A hub repository id: "name" or "owner/name", as the hub spells them.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_model_location(name: str | os.PathLike, option: str = "--model_name_or_path") -> None:
    """Raise ValueError unless ``name`` is a model folder (config.json inside) or could be a hub id.

    A folder that a killed save left mid-publication is completed first (seft_trl.saving).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        complete_publication(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{option}={str(name)!r} is a folder but not a model: it has no config.json. Give the "
                             "folder that save_pretrained (or seft-trl) wrote.")
        return
    if path.exists():
        raise ValueError(f"{option}={str(name)!r} is a file: give the model's folder (config.json and weights).")
    if not HUB_ID.fullmatch(str(name)):
        raise ValueError(f"{option}={str(name)!r} does not exist (and is not a hub model id either).")
    if hub_offline():
        raise ValueError(f"{option}={str(name)!r} does not exist here, and with HF_HUB_OFFLINE set it cannot be "
                         "fetched from the hub.")
