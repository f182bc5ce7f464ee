"""The method registry: run-config ``strategy`` -> ``Method`` class.

Built-in methods register themselves with ``@register_method`` when
``fedalora.methods`` is imported. A method of your own lives in any importable module
(in a Flower app: a module of the app directory, so that it travels in the FAB) and is
named by import path, ``strategy='my_methods.ema:EmaBLoRA'``; importing that module
registers it, and it runs exactly as a built-in one.
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from ..errors import ConfigError
from .base import Method

M = TypeVar("M", bound=type[Method])
_METHODS: dict[str, type[Method]] = {}


def register_method(cls: M) -> M:
    """Class decorator: register ``cls`` under ``cls.name``; another class may not take
    a name already registered (re-importing the same module is fine)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute 'name' (a non-empty str)")
    known = _METHODS.get(name)
    if known is not None and _qualified(known) != _qualified(cls):
        raise ValueError(
            f"method name '{name}' is taken by {_qualified(known)}; "
            f"give {_qualified(cls)} another name"
        )
    _METHODS[name] = cls
    return cls


def method_class(strategy: str) -> type[Method]:
    """The method a run-config ``strategy`` names: a registered name or an import path
    ``package.module:Class``; ConfigError if there is none."""
    if ":" in strategy:
        return _import_method(strategy)
    if strategy not in _METHODS:
        raise ConfigError(
            "strategy",
            f"unknown strategy '{strategy}'; choose one of: "
            f"{', '.join(_METHODS)}, or name your own Method subclass by "
            "import path, e.g. 'my_methods.ema:EmaBLoRA'",
        )
    return _METHODS[strategy]


def registered_methods(built_in: bool = False) -> dict[str, type[Method]]:
    """Every registered method by name, in registration order; with ``built_in`` only
    those of this package."""
    return {
        name: cls
        for name, cls in _METHODS.items()
        if not built_in or cls.__module__.startswith(__package__ + ".")
    }


def _import_method(path: str) -> type[Method]:
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            "strategy",
            f"cannot import '{module_name}' for '{path}': {exc}; "
            "give 'package.module:Class' importable from the app "
            "directory",
        ) from exc
    cls = getattr(module, attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(
            "strategy",
            f"'{path}' is not a Method subclass; give "
            "'package.module:Class' of a fedalora.methods.Method",
        )
    return cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
