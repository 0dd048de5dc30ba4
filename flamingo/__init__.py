"""flamingo: Flamingo-style visual language models on any Hugging Face vision tower and causal LM."""

from .build import from_backbones, load_pretrained
from .config import FlamingoConfig
from .model.flamingo import Flamingo, FlamingoOutput
from .processing import FlamingoProcessor

__all__ = ["Flamingo", "FlamingoConfig", "FlamingoOutput", "FlamingoProcessor", "from_backbones", "load_pretrained"]
__version__ = "0.1.0"
