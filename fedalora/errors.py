"""The errors a run ends with: a run-config value that cannot work (with its fix), and a
run that did not do what it would report (nothing trained, a client that crashed)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key and what is allowed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"run-config '{key}': {problem}")
        self.key, self.problem = key, problem


class RunFailed(RuntimeError):
    """The run cannot report a result: its message is the headline (which clients
    failed, with their own exception type and message)."""


def require(ok: bool, key: str, problem: str) -> None:
    """Raise ``ConfigError(key, problem)`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, problem)


def exception_line(exc: BaseException) -> str:
    """``<type>: <message>`` of an exception, on one line (a ConfigError: its headline)."""
    if isinstance(exc, ConfigError):
        return str(exc)
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
