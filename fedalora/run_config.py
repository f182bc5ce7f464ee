"""Run-config text and the app's declared keys, read without loading the library's
models or methods (the launchers check a run's keys before anything starts)."""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError


def parse_run_config(text: str) -> dict[str, Any]:
    """``key=value`` pairs as ``flwr run --run-config`` reads them (values in TOML:
    strings quoted, e.g. "strategy='fedalora' ranks='8' lr=0.002")."""
    pairs = re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", text)
    try:
        return tomllib.loads("\n".join(f"{key} = {value}" for key, value in pairs))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            "run-config",
            f"cannot read '{text}': {exc}; write key=value pairs "
            "separated by spaces, strings in quotes, e.g. \"ranks='8,4' lr=0.002\"",
        ) from exc


def format_run_config(values: Mapping[str, Any]) -> str:
    """``values`` as the ``key=value`` text ``parse_run_config`` reads back (booleans in
    TOML's lower case, strings single-quoted)."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return str(item).lower()
        return f"'{item}'" if isinstance(item, str) else str(item)

    return " ".join(f"{key}={value(item)}" for key, item in values.items())


def resolve_run_config(app_dir: str | Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]`` (pyproject.toml) with ``overrides``, which
    must be keys it declares, as ``flwr run --run-config`` requires: an unknown key is a
    ConfigError that names the closest declared one."""
    manifest = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text(encoding="utf-8"))
    declared: dict[str, Any] = dict(manifest["tool"]["flwr"]["app"]["config"])
    for key in overrides:
        if key not in declared:
            raise ConfigError(key, unknown_key_problem(key, declared))
    return {**declared, **overrides}


def unknown_key_problem(key: str, known: Iterable[str]) -> str:
    """The problem of an unknown run-config ``key``, naming the closest of ``known``."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (
        f"unknown key; {hint}the keys are those of pyproject.toml's "
        "[tool.flwr.app.config] (docs/configuration.md)"
    )
