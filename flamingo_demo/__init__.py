"""`flamingo demo` beside the library: a procedural world of coloured shapes, its datasets, home-grown backbones,
and the stages that train and evaluate a mini Flamingo on them through the library's public API.

    manifest = write_world(root, "binding", seed=0)          # datasets + root/world.json
    report = grow_backbones(manifest, root / "backbones")    # tokenizer/, vision/, lm/ + backbones.json
    flamingo.from_backbones(vision=report["vision"]["dir"], lm=report["lm"]["dir"])

The public names load on first use (PEP 562), as the library's do: `flamingo demo --help` imports neither torch nor
transformers. Its modules run as commands (`flamingo demo`, and `python -m flamingo_demo.evaluate` under torchrun), so
the package drops the start-up warnings that say nothing about a run (`flamingo.runtime.quiet`) before anything
imports transformers, as the CLI does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flamingo.runtime.lazy import lazy_getattr
from flamingo.runtime.quiet import quiet_irrelevant_warnings

quiet_irrelevant_warnings()

if TYPE_CHECKING:
    from .backbones import grow_backbones
    from .build_world import write_world
    from .lm import grow_lm
    from .sizes import SIZES, MiniSize, get_size
    from .tokenizer import grow_tokenizer
    from .tower import grow_vision
    from .world import World

_HOMES = {"grow_backbones": ".backbones", "write_world": ".build_world", "grow_lm": ".lm", "SIZES": ".sizes",
          "MiniSize": ".sizes", "get_size": ".sizes", "grow_tokenizer": ".tokenizer", "grow_vision": ".tower",
          "World": ".world"}
__all__ = ["SIZES", "MiniSize", "World", "get_size", "grow_backbones", "grow_lm", "grow_tokenizer", "grow_vision",
           "write_world"]
__getattr__ = lazy_getattr(__name__, _HOMES)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
