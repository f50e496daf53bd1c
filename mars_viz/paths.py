"""Where mars_viz reads its bundled files and writes its caches: one home for both, imported by everything else.

Example:
    >>> (ASSETS / "prompts" / "harmful.txt").is_file()
    True
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ASSETS", "cache_dir"]

_HERE = Path(__file__).resolve().parent
# Prompt sets, examples, refusal phrases: `mars_viz/assets` in an installed wheel (package data), else the source
# checkout's top-level `assets/` (which pyproject.toml installs as `mars_viz/assets`).
ASSETS = _HERE / "assets" if (_HERE / "assets" / "prompts").is_dir() else _HERE.parent / "assets"


def cache_dir() -> Path:
    """The cache root: `$MARS_VIZ_CACHE`, else `~/.cache/mars_viz` (states, datasets, the offline demo model)."""
    return Path(os.environ.get("MARS_VIZ_CACHE", Path.home() / ".cache" / "mars_viz"))
