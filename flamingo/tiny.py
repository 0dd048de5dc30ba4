"""Tiny random backbones built from configs, offline: for tests, benchmarks and the README's smoke command.

Nothing here downloads anything. The tokenizer is a byte-level BPE trained in memory on a few sentences; the models
are HF classes instantiated from small configs with random weights (hidden 32, a few layers, as IDEFICS's tests do).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from .build import from_backbones
from .config import FlamingoConfig
from .model.flamingo import Flamingo
from .model.mosaic_gpt import register as register_mosaic_gpt
from .processing import FlamingoProcessor
from .runtime.compat import pil_image_processor

CLIPImageProcessor = pil_image_processor("CLIPImageProcessor")
SiglipImageProcessor = pil_image_processor("SiglipImageProcessor")

_CORPUS = [
    "Question: what is in the image? Short answer: a red circle.",
    "An image of a small blue square on a green background.",
    "Output: two yellow triangles moving to the left.",
    "The cat sat on the mat. A dog runs in the park. Birds fly over the sea.",
    "Caption: a photo of a big purple star next to a tiny orange heart.",
    "0 1 2 3 4 5 6 7 8 9 yes no left right up down",
]


def tiny_tokenizer(vocab_size: int = 300, pad_vocab_to: Optional[int] = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory (no hub access). Has EOS/BOS but no pad token.

    pad_vocab_to: grow the vocabulary with filler entries (never produced by the merges) to a realistic size, so
    that benchmarks pay a real LM-head / embedding cost (e.g. 32000).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if pad_vocab_to is not None and pad_vocab_to > tok.get_vocab_size():
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        vocab.update({f"<filler_{i}>": i for i in range(len(vocab), pad_vocab_to)})
        tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token=None
    )


# Small configs per architecture: hidden 32, 2-4 layers, so a forward pass takes milliseconds on a CPU.
_LM_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=4, n_head=4, n_positions=512),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                word_embed_proj_dim=32),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2),
    "phi": dict(model_type="phi", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4),
    "mpt": dict(model_type="mpt", d_model=32, n_heads=4, n_layers=4, max_seq_len=512),
    "mosaic_gpt": dict(model_type="mosaic_gpt", d_model=32, n_heads=4, n_layers=4, max_seq_len=512, attn_qk_ln=True),
    "gemma": dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8),
}

LM_KINDS = tuple(_LM_CONFIGS)
VISION_KINDS = ("clip", "siglip")


def tiny_lm(kind: str = "llama", vocab_size: int = 300, seed: int = 0, **overrides) -> PreTrainedModel:
    """A random causal LM of the given architecture (see `LM_KINDS`), eval mode, fp32."""
    if kind not in _LM_CONFIGS:
        raise ValueError(f"unknown tiny LM kind {kind!r}; choose from {LM_KINDS}")
    kw = dict(_LM_CONFIGS[kind])
    model_type = kw.pop("model_type")
    kw.update(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    kw.update(overrides)
    register_mosaic_gpt()
    config = AutoConfig.for_model(model_type, **kw)
    config._attn_implementation = "eager" if kind in ("gpt2", "mpt") else "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if kind == "mosaic_gpt":  # its biases and QK LayerNorms start at 0 / 1: random, so that they count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias") or "_ln." in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_vision(kind: str = "clip", image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                num_layers: int = 2, seed: int = 0) -> PreTrainedModel:
    """A random CLIP or SigLIP vision tower (patch features of width `hidden_size`)."""
    kw = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
              num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    if kind == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**kw)).eval()
    if kind == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(**kw)).eval()
    raise ValueError(f"unknown tiny vision kind {kind!r}; choose from {VISION_KINDS}")


def tiny_image_processor(kind: str = "clip", image_size: int = 32):
    """The HF image processor matching `tiny_vision(kind, image_size)`."""
    if kind == "clip":
        return CLIPImageProcessor(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size})
    if kind == "siglip":
        return SiglipImageProcessor(size={"height": image_size, "width": image_size})
    raise ValueError(f"unknown tiny vision kind {kind!r}; choose from {VISION_KINDS}")


def random_image(seed: int, size: int = 32) -> "Image.Image":
    """A reproducible noise image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def set_gates(model: torch.nn.Module, value: float = 0.5) -> None:
    """Set every tanh gate of a Flamingo's xattn blocks (tests: with the init's zeros image tests are vacuous)."""
    with torch.no_grad():
        for block in model.xattn:
            if block.gated:
                block.attn_gate.fill_(value)
                block.ffw_gate.fill_(value)


def tiny_flamingo_config(**overrides) -> FlamingoConfig:
    """A FlamingoConfig small enough for tests: 4 heads of 8, 8 latents, 2 resampler layers, 4 frames."""
    base = dict(xattn_heads=4, xattn_head_dim=8, resampler_heads=4, resampler_head_dim=8, num_latents=8,
                resampler_depth=2, max_frames=4)
    return FlamingoConfig(**{**base, **overrides})


def tiny_flamingo(lm: str = "llama", vision: str = "clip", *, gates: float = 0.5, seed: int = 0,
                  lm_overrides: Optional[dict[str, Any]] = None, **config_overrides: Any
                  ) -> tuple[Flamingo, FlamingoProcessor]:
    """A small Flamingo on random tiny backbones (`tiny_lm(lm)`, `tiny_vision(vision)`, `tiny_tokenizer()`), its
    new modules initialised under `seed` and every tanh gate at `gates` (0: the bare LM), in eval mode."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model, processor = from_backbones(tiny_vision(vision), tiny_lm(lm, vocab_size=len(tok), **(lm_overrides or {})),
                                      tok, tiny_flamingo_config(**config_overrides),
                                      image_processor=tiny_image_processor(vision))
    set_gates(model, gates)
    return model.eval(), processor
