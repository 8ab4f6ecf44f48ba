"""Headless Chromium for tests that look at a page the way a person's browser shows it.

Flags as this machine needs them: no sandbox (root), no GPU, and no background networking (the closed
network refuses Chromium's own connections). Tests skip cleanly where no browser is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _run(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
    command = [CHROMIUM, *flags, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def dump_dom(page: Path, profile: Path) -> str:
    """The DOM after the page loaded (what the browser parsed, not the file's text)."""
    return _run(page, profile, "--dump-dom").stdout


def screenshot(page: Path, png: Path, profile: Path, size: str = "1200,2600") -> Path:
    _run(page, profile, f"--window-size={size}", f"--screenshot={png}")
    return png
