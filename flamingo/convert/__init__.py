"""Foreign checkpoints -> our model: OpenFlamingo 2.x (`openflamingo.py`) and Hugging Face's IDEFICS (`idefics.py`)."""

from .idefics import from_idefics
from .openflamingo import convert_openflamingo, infer_config, load_openflamingo_state

__all__ = ["convert_openflamingo", "from_idefics", "infer_config", "load_openflamingo_state"]
