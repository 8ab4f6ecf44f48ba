"""Two facts about paths that every floor asks: where medtune's cache lives, and whether a name means a local
path or a hub id."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The tokenized cache and the tiny base live here (MEDTUNE_CACHE, else ~/.cache/medtune)."""
    return Path(os.environ.get("MEDTUNE_CACHE", Path.home() / ".cache" / "medtune"))


def looks_local(name: str) -> bool:
    """Meant as a local path rather than a hub id (org/name): a hub look-up of it could only time out."""
    first = name.split("/")[0]
    return (
        name.startswith((".", "/", "~", "\\")) or name.count("/") != 1 or Path(first).is_dir() or Path(name).exists()
    )
