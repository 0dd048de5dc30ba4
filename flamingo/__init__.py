"""flamingo: Flamingo-style visual language models on any Hugging Face vision tower and causal LM.

The public names load on first use (PEP 562): importing a submodule (the CLI, `flamingo.config`) does not import
transformers and every backbone class first."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .runtime.lazy import lazy_getattr

if TYPE_CHECKING:
    from .build import from_backbones, load_pretrained
    from .config import FlamingoConfig
    from .hub import push_to_hub
    from .model.flamingo import Flamingo, FlamingoOutput
    from .processing import FlamingoProcessor

_HOMES = {"Flamingo": ".model.flamingo", "FlamingoConfig": ".config", "FlamingoOutput": ".model.flamingo",
          "FlamingoProcessor": ".processing", "from_backbones": ".build", "load_pretrained": ".build",
          "push_to_hub": ".hub"}
__all__ = ["Flamingo", "FlamingoConfig", "FlamingoOutput", "FlamingoProcessor", "from_backbones", "load_pretrained",
           "push_to_hub"]
__version__ = "0.1.0"
__getattr__ = lazy_getattr(__name__, _HOMES)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
