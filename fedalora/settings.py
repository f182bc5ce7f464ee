"""Configuration sections: frozen dataclasses whose fields carry their run-config key,
default and help in field metadata (as PEFT's ``LoraConfig`` carries its help), each
checking its own values in ``validate``.

A field made with ``setting`` is one run-config key; a field made with ``section`` holds
a section of its own (its keys sit beside the outer ones, flat, as Flower's run-config
is). ``fedalora.config.FedConfig`` is the section of sections; the pyproject table and
the key reference (``python -m fedalora.config``) are read from it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Self

from .errors import ConfigError

_SECTION = "section"


def setting(key: str, default: Any, help: str) -> Any:
    """A field that is run-config ``key`` with its default and one-line help."""
    return dataclasses.field(default=default, metadata={"key": key, "help": help})


def section(cls: type[Section]) -> Any:
    """A field that holds section ``cls`` (its keys are the outer section's too)."""
    return dataclasses.field(default_factory=cls, metadata={_SECTION: cls})


class Section:
    """A frozen dataclass of run-config keys (subclasses are ``@dataclass(frozen=True)``).
    A field without a ``key`` in its metadata is the key of its name with dashes."""

    #: The heading of the section in the key reference.
    title: ClassVar[str] = ""

    def validate(self) -> None:
        """Check the section's values (raise ``ConfigError`` naming the key); the default
        checks the sections it holds."""
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if _SECTION in field.metadata:
                getattr(self, field.name).validate()

    @classmethod
    def fields_by_key(cls) -> dict[str, dataclasses.Field[Any]]:
        """Run-config key -> field, over this section and the sections it holds."""
        return {key: field for key, _, field in cls.settings()}

    @classmethod
    def settings(cls) -> Iterator[tuple[str, tuple[str, ...], dataclasses.Field[Any]]]:
        """(key, attribute path, field) of every key, in declaration order."""
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            inner = field.metadata.get(_SECTION)
            if inner is not None:
                for key, path, leaf in inner.settings():
                    yield key, (field.name, *path), leaf
            elif not field.metadata.get("skip"):
                yield key_of(field), (field.name,), field

    @classmethod
    def sections(cls) -> Iterator[type[Section]]:
        """This section and every section it holds, depth first."""
        yield cls
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if _SECTION in field.metadata:
                yield from field.metadata[_SECTION].sections()

    @classmethod
    def from_run_config(cls, values: Mapping[str, Any]) -> Self:
        """The section with the keys ``values`` gives (converted to the fields' types,
        else ConfigError) and every other key at its default; other keys are ignored."""
        built: dict[str, Any] = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            inner = field.metadata.get(_SECTION)
            if inner is not None:
                built[field.name] = inner.from_run_config(values)
            elif not field.metadata.get("skip") and key_of(field) in values:
                key = key_of(field)
                built[field.name] = coerce(key, values[key], type(field.default))
        return cls(**built)

    def to_run_config(self) -> dict[str, Any]:
        """Key -> value of every key of the section."""
        values: dict[str, Any] = {}
        for key, path, _ in self.settings():
            value: Any = self
            for name in path:
                value = getattr(value, name)
            values[key] = value
        return values


def key_of(field: dataclasses.Field[Any]) -> str:
    """The run-config key of a field: its ``key`` metadata, else its name with dashes."""
    return str(field.metadata.get("key", field.name.replace("_", "-")))


def coerce(key: str, raw: Any, kind: type) -> Any:
    """Convert a run-config value to the schema's type, or raise ConfigError."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in {"true", "false"}:
            return raw.lower() == "true"
        raise ConfigError(key, f"expected true or false, got {raw!r}")
    if kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"[+-]?\d+", raw.strip()):
            return int(raw)
        raise ConfigError(key, f"expected an integer, got {raw!r}")
    if kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected a number, got {raw!r}") from None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return str(raw)  # e.g. ranks="8" parsed by TOML as the integer 8
    if not isinstance(raw, str):
        raise ConfigError(key, f"expected a string, got {raw!r}")
    return raw
