"""Shared fixtures: tiny random backbones (hidden 32), a factory for Flamingo models with non-zero gates, and a
training world (saved backbones and fixture datasets) per test module."""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch
from PIL import Image

from flamingo.tiny import tiny_flamingo

from train_fixtures import save_backbones, write_datasets


@pytest.fixture
def make_model() -> Callable:
    def make(lm_kind: str = "llama", vision_kind: str = "clip", gates: float = 0.5, **config_overrides):
        return tiny_flamingo(lm_kind, vision_kind, gates=gates, **config_overrides)

    return make


@pytest.fixture
def no_tf32():
    """fp32 convolutions and matmuls in full precision on CUDA, for tests that compare fp32 results at tight
    tolerances: cuDNN may pick another algorithm per batch size (a CUDA-graph replay at a padded size, a batch against
    one row alone), and TF32's rounding would differ between them."""
    # set and restored by hand: pytest's monkeypatch (9.x) restores an attribute the object resolves in __getattr__,
    # as cuBLAS's switch is, by deleting it, which torch's module refuses at teardown
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def one_thread():
    """Hidden-32 models gain nothing from intra-op threads, and lose a lot to them on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple:
    """(root, vision dir, LM dir, dataset paths): tiny backbones saved and the fixture datasets written."""
    root = str(tmp_path_factory.mktemp("world"))
    vision, lm = save_backbones(root)
    return root, vision, lm, write_datasets(os.path.join(root, "data"))


@pytest.fixture
def conversions(monkeypatch):
    """Counts frames converted to PIL images during decode_video (each converted frame is held until it returns)."""
    count = [0]
    convert = Image.Image.convert

    def counting(self, *args, **kwargs):
        count[0] += 1
        return convert(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", counting)
    return count
