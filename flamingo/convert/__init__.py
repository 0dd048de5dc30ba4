"""Foreign checkpoints -> our model: OpenFlamingo 2.x and v1 (`openflamingo.py`, its published LMs in
`lm_families.py`), Hugging Face's IDEFICS (`idefics.py`), Otter (`otter.py`) and Multimodal-GPT (`mmgpt.py`); and
our model -> OpenFlamingo's `checkpoint.pt` (`to_openflamingo.py`) and transformers' IDEFICS (`to_idefics.py`)."""

from .checkpoints import write_backbones
from .idefics import from_idefics
from .lm_families import load_openflamingo_lm
from .mmgpt import convert_mmgpt
from .openflamingo import (
    PUBLISHED,
    PUBLISHED_V1,
    convert_openflamingo,
    infer_config,
    load_openflamingo_state,
    published_openflamingo,
)
from .otter import from_otter
from .to_idefics import save_idefics
from .to_openflamingo import openflamingo_state, save_openflamingo_checkpoint

__all__ = ["PUBLISHED", "PUBLISHED_V1", "convert_mmgpt", "convert_openflamingo", "from_idefics", "from_otter",
           "infer_config", "load_openflamingo_lm", "load_openflamingo_state", "openflamingo_state",
           "published_openflamingo", "save_idefics", "save_openflamingo_checkpoint", "write_backbones"]
