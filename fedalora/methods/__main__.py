"""List the registered methods: ``python -m fedalora.methods [package.module ...]`` (the
named modules are imported first, so that methods of your own are listed too)."""

from __future__ import annotations

import importlib
import sys

from ..variants import UNBATCHED
from .registry import registered_methods


def main() -> None:
    for module in sys.argv[1:]:
        importlib.import_module(module)
    for name, cls in registered_methods().items():
        ranks = "any ranks" if cls.heterogeneous else "one rank"
        print(f"{name}  ({cls.__module__}.{cls.__qualname__}; {ranks})")
        print(f"    {cls.paper or 'no paper'}")
        print(f"    LoRA variants: {', '.join(sorted(cls.accepts)) or 'none'}")
        refusal = cls.nonlinear_reason
        print(f"    client-level DP: {'refused, ' + refusal if refusal else 'yes'}")
        for key, field in cls.Options.fields_by_key().items():
            print(f"    {key} = {field.default!r}: {field.metadata.get('help', '')}")
    print("Cohorts (fedalora.cohort): clients share a batched pass when their adapter defines")
    print("output_delta (every built-in one does), except with these LoRA variants, whose")
    print("clients train one after another:")
    for key, problem in UNBATCHED.items():
        print(f"    {key}: {problem}")


if __name__ == "__main__":
    main()
