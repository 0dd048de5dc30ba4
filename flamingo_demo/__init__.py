"""`flamingo demo` beside the library: a procedural world of coloured shapes, its datasets, home-grown backbones,
and the stages that train and evaluate a mini Flamingo on them through the library's public API.

    manifest = write_world(root, "binding", seed=0)          # datasets + root/world.json
    report = grow_backbones(manifest, root / "backbones")    # tokenizer/, vision/, lm/ + backbones.json
    flamingo.from_backbones(vision=report["vision"]["dir"], lm=report["lm"]["dir"])
"""

from .backbones import grow_backbones
from .build_world import write_world
from .lm import grow_lm
from .sizes import SIZES, MiniSize, get_size
from .tokenizer import grow_tokenizer
from .tower import grow_vision
from .world import World

__all__ = ["SIZES", "MiniSize", "World", "get_size", "grow_backbones", "grow_lm", "grow_tokenizer", "grow_vision",
           "write_world"]
