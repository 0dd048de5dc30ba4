"""Shared fixtures: tiny random backbones (hidden 32) and a factory for Flamingo models with non-zero gates."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from flamingo import from_backbones
from flamingo.tiny import set_gates, tiny_flamingo_config, tiny_image_processor, tiny_lm, tiny_tokenizer, tiny_vision


@pytest.fixture
def make_model() -> Callable:
    def make(lm_kind: str = "llama", vision_kind: str = "clip", gates: float = 0.5, **config_overrides):
        torch.manual_seed(0)
        tok = tiny_tokenizer()
        config = tiny_flamingo_config(**config_overrides)
        model, processor = from_backbones(tiny_vision(vision_kind), tiny_lm(lm_kind, vocab_size=len(tok)), tok, config,
                                          image_processor=tiny_image_processor(vision_kind))
        set_gates(model, gates)
        return model.eval(), processor

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Hidden-32 models gain nothing from intra-op threads, and lose a lot to them on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
