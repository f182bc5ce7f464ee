"""The error a user can act on: a run-config value that cannot work, with its fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key and what is allowed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"run-config '{key}': {problem}")
        self.key, self.problem = key, problem


def require(ok: bool, key: str, problem: str) -> None:
    """Raise ``ConfigError(key, problem)`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, problem)
