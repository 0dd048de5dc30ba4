"""Training data: MMC4 interleaved documents, image–text pairs and video–text pairs as resumable batch sources.

Formats and rules: docs/data.md. The trainer calls `build_sources(config.data, processor, rank=, world_size=, seed=,
num_workers=)`; each source yields collated batches for `Flamingo.forward` and has `state_dict/load_state_dict`.
"""

from .build import DatasetSource, build_source, build_sources
from .errors import REASONS, SkipSample
from .interleaved import build_interleaved_text, match_images
from .mixture import MixtureSampler, WeightedMixture
from .sequence import collate, make_labels
from .spec import KINDS, DatasetSpec

__all__ = ["DatasetSource", "DatasetSpec", "KINDS", "REASONS", "MixtureSampler", "SkipSample", "WeightedMixture",
           "build_interleaved_text", "build_source", "build_sources", "collate", "make_labels", "match_images"]
