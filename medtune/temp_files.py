"""Temporary siblings that become a file or directory by an atomic rename, and the clean-up of the ones a
killed process left: ``.{name}.tmp-{host}-{pid}`` beside the target, removed only when that host is this
machine and that process is gone (never another machine's, never a live one's, never a name medtune did
not make)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path


def temp_sibling(path: Path) -> Path:
    """Unique per machine and process: on a filesystem several machines share, each may be writing one."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def remove_dead_temps(path: Path) -> None:
    """Remove the temporary siblings of ``path`` whose writer, on this machine, has died."""
    prefix = f".{path.name}.tmp-{socket.gethostname()}-"
    for stale in path.parent.glob(f"{glob_escape(prefix)}*"):
        pid = stale.name[len(prefix) :]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
