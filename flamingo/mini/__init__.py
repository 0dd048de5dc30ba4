"""The mini world: a procedural world of coloured shapes, its datasets and home-grown backbones, for `flamingo demo`.

    manifest = write_world(root, "binding", seed=0)          # datasets + root/world.json
    report = grow_backbones(manifest, root / "backbones")    # tokenizer/, vision/, lm/ + backbones.json
    flamingo.from_backbones(vision=report["vision"]["dir"], lm=report["lm"]["dir"])
"""

from .backbones import grow_backbones, grow_lm, grow_tokenizer, grow_vision
from .sizes import SIZES, MiniSize, get_size
from .world import World
from .writers import write_world

__all__ = ["SIZES", "MiniSize", "World", "get_size", "grow_backbones", "grow_lm", "grow_tokenizer", "grow_vision",
           "write_world"]
