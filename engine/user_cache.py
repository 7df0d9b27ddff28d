"""The diffsplit user cache folder: ``$DIFFSPLIT_CACHE`` or ``~/.cache/diffsplit``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "DIFFSPLIT_CACHE"


def cache_root() -> Path:
    """The diffsplit user cache: ``$DIFFSPLIT_CACHE`` or ``~/.cache/diffsplit``."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "diffsplit"
