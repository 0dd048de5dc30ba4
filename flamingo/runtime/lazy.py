"""Packages whose public names load on first use (PEP 562), so that importing one submodule (the CLI, a config) does
not import torch, transformers and every class the package exports."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_getattr(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """`package`'s module-level `__getattr__`: a name of `homes` (name -> its module, relative to the package) is
    imported on first use and then kept in the package's namespace (later lookups skip this function)."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
