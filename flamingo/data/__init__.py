"""Training data: MMC4 interleaved documents, image–text pairs and video–text pairs as resumable batch sources.

Formats and rules: docs/data.md. The trainer calls `build_sources(config.data, processor, rank=, world_size=, seed=,
num_workers=)`; each source yields collated batches for `Flamingo.forward` and has `state_dict/load_state_dict`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..runtime.lazy import lazy_getattr

if TYPE_CHECKING:
    from .build import DatasetSource, build_source, build_sources
    from .errors import REASONS, SkipSample
    from .interleaved import build_interleaved_text, match_images
    from .kinds import KINDS
    from .mixture import MixtureSampler, WeightedMixture
    from .sequence import collate, make_labels
    from .spec import DatasetSpec

# Names load on first use (PEP 562): `flamingo data --help` lists the kinds without importing the loaders.
_HOMES = {"DatasetSource": ".build", "build_source": ".build", "build_sources": ".build", "REASONS": ".errors",
          "SkipSample": ".errors", "build_interleaved_text": ".interleaved", "match_images": ".interleaved",
          "KINDS": ".kinds", "MixtureSampler": ".mixture", "WeightedMixture": ".mixture", "collate": ".sequence",
          "make_labels": ".sequence", "DatasetSpec": ".spec"}
__all__ = ["DatasetSource", "DatasetSpec", "KINDS", "REASONS", "MixtureSampler", "SkipSample", "WeightedMixture",
           "build_interleaved_text", "build_source", "build_sources", "collate", "make_labels", "match_images"]
__getattr__ = lazy_getattr(__name__, _HOMES)
