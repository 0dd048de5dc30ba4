"""The OpenFlamingo peers (2.0.1, and v1: 0.0.2), built on our HF backbones, for equality tests and benchmarks.

OpenFlamingo 2.0.1 is installed from PyPI with `pip install --no-deps open-flamingo==2.0.1 einops einops-exts`. Its
package `__init__` imports open_clip (which pulls torchvision), so its model modules (`open_flamingo/src/helpers.py`,
`flamingo_lm.py`, `flamingo.py`, `utils.py`) are loaded from their files under a private package name without running
that `__init__`. Nothing of OpenFlamingo is copied here. The peer uses OpenFlamingo's own mechanism (its mixin
class swap) on its own LM copy: that is the peer's behaviour, not ours.

OpenFlamingo v1 has the same package name, so it lives in a directory of its own, `pip install --no-deps --target
.peers/open-flamingo-0.0.2 open-flamingo==0.0.2` (or wherever `OPENFLAMINGO_V1_PATH` says), and its modules are
loaded from there the same way, under another private name.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

_PACKAGE = "_openflamingo_peer"
_DECODER_LAYERS = {"opt": "model.decoder.layers", "gptj": "transformer.h", "gpt2": "transformer.h",
                   "gpt_neox": "gpt_neox.layers", "llama": "model.layers", "mistral": "model.layers",
                   "qwen2": "model.layers", "phi": "model.layers", "mpt": "transformer.blocks",
                   "mosaic_gpt": "transformer.blocks"}


_V1_PACKAGE = "_openflamingo_v1_peer"
V1_PATH_VARIABLE = "OPENFLAMINGO_V1_PATH"
_V1_DEFAULT = Path(__file__).resolve().parents[2] / ".peers" / "open-flamingo-0.0.2"  # a repository checkout's


def openflamingo_v1_dir() -> Path:
    """The directory holding OpenFlamingo 0.0.2's `open_flamingo/` (a `pip install --target` directory)."""
    return Path(os.environ.get(V1_PATH_VARIABLE) or _V1_DEFAULT)


@lru_cache(maxsize=1)
def load_openflamingo_modules() -> types.SimpleNamespace:
    """OpenFlamingo's model modules, loaded from the installed package's files without its `__init__`."""
    spec = importlib.util.find_spec("open_flamingo")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("OpenFlamingo is not installed: "
                          "pip install --no-deps open-flamingo==2.0.1 einops einops-exts")
    return load_modules(Path(list(spec.submodule_search_locations)[0]) / "src", _PACKAGE)


@lru_cache(maxsize=1)
def load_openflamingo_v1_modules() -> types.SimpleNamespace:
    """OpenFlamingo v1's (0.0.2) model modules, from `openflamingo_v1_dir()`, without its `__init__`."""
    src = openflamingo_v1_dir() / "open_flamingo" / "src"
    if not (src / "flamingo_lm.py").is_file():
        raise ImportError(f"OpenFlamingo v1 is not in {openflamingo_v1_dir()}: pip install --no-deps --target "
                          f"{openflamingo_v1_dir()} open-flamingo==0.0.2 (or set {V1_PATH_VARIABLE})")
    return load_modules(src, _V1_PACKAGE)


def load_modules(src: Path, package_name: str) -> types.SimpleNamespace:
    """OpenFlamingo's four model modules (`utils`, `helpers`, `flamingo_lm`, `flamingo`) from the directory `src`, as
    the private package `package_name`."""
    package = types.ModuleType(package_name)
    package.__path__ = [str(src)]
    sys.modules[package_name] = package
    loaded = {}
    for name in ("utils", "helpers", "flamingo_lm", "flamingo"):
        mod_spec = importlib.util.spec_from_file_location(f"{package_name}.{name}", src / f"{name}.py")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
        loaded[name] = module
    return types.SimpleNamespace(
        Flamingo=loaded["flamingo"].Flamingo, FlamingoLMMixin=loaded["flamingo_lm"].FlamingoLMMixin,
        extend_instance=loaded["utils"].extend_instance, PerceiverResampler=loaded["helpers"].PerceiverResampler,
        GatedCrossAttentionBlock=loaded["helpers"].GatedCrossAttentionBlock)


class HFVisualForOpenFlamingo(nn.Module):
    """An HF vision tower dressed as open_clip's `.visual` with `output_tokens=True`: returns (pooled, tokens),
    tokens = the tower's last_hidden_state without its CLS token (CLIP/ViT have one, SigLIP has none)."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.tower(pixel_values=pixel_values).last_hidden_state  # (M, 1 + S or S, D)
        cfg = self.tower.config
        patches = (cfg.image_size // cfg.patch_size) ** 2
        tokens = hidden[:, 1:] if hidden.shape[1] == patches + 1 else hidden
        return tokens.mean(dim=1), tokens


class CLIPForOpenFlamingo(nn.Module):
    """open_clip's whole CLIP as OpenFlamingo's factory passes it: the tower as `.visual` (`HFVisualForOpenFlamingo`)
    and a text tower under open_clip's names beside it. 2.x keeps the `.visual` alone; v1 keeps the whole module, so
    its `state_dict()` holds both, as Med-Flamingo's `model.pt` does. The text tower is never run (Flamingo reads only
    images): a tiny random one (context 77, `width` wide) stands in for CLIP's by its names, not its size."""

    def __init__(self, tower: nn.Module, width: int = 16, layers: int = 1, vocab: int = 64) -> None:
        super().__init__()
        self.visual = HFVisualForOpenFlamingo(tower)
        with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as without it
            torch.manual_seed(0)
            self.token_embedding = nn.Embedding(vocab, width)
            self.positional_embedding = nn.Parameter(0.01 * torch.randn(77, width))
            self.transformer = nn.ModuleDict({"resblocks": nn.ModuleList(
                nn.ModuleDict({"ln_1": nn.LayerNorm(width), "attn": nn.MultiheadAttention(width, 2),
                               "ln_2": nn.LayerNorm(width),
                               "mlp": nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                                                c_proj=nn.Linear(4 * width, width)))})
                for _ in range(layers))})
            self.ln_final = nn.LayerNorm(width)
            self.text_projection = nn.Parameter(torch.randn(width, width) / math.sqrt(width))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def _mixin_with_optional_mask(base: type) -> type:
    """OpenFlamingo's mixin wants `attention_mask` positionally; HF 5's generate may omit it."""

    class LMMixin(base):  # type: ignore[misc, valid-type]
        def forward(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
            return super().forward(input_ids, attention_mask, **kwargs)

    return LMMixin


def build_openflamingo(vision: nn.Module, lm: nn.Module, tokenizer: Any, cross_attn_every_n_layers: int = 1,
                       decoder_layers_attr_name: Optional[str] = None, v1: bool = False,
                       modules: Optional[types.SimpleNamespace] = None) -> tuple[nn.Module, Any]:
    """OpenFlamingo's `create_model_and_transforms`, on the given (copied by the caller) HF backbones; v1: OpenFlamingo
    0.0.2's (its mixin conditions every decoder layer of `get_decoder().layers`); modules: another copy of
    OpenFlamingo's modules (`load_modules`' result, e.g. Multimodal-GPT's)."""
    of = modules or (load_openflamingo_v1_modules() if v1 else load_openflamingo_modules())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    of.extend_instance(lm, _mixin_with_optional_mask(of.FlamingoLMMixin))
    if decoder_layers_attr_name is None:
        model_type = lm.config.model_type
        if model_type not in _DECODER_LAYERS:
            raise ValueError(f"pass decoder_layers_attr_name for model_type {model_type!r}")
        decoder_layers_attr_name = _DECODER_LAYERS[model_type]
    lm.set_decoder_layers_attr_name(decoder_layers_attr_name)
    lm.resize_token_embeddings(len(tokenizer))
    model = of.Flamingo(CLIPForOpenFlamingo(vision), lm,
                        tokenizer.encode("<|endofchunk|>")[-1], tokenizer.encode("<image>")[-1],
                        vis_dim=vision.config.hidden_size, cross_attn_every_n_layers=cross_attn_every_n_layers)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    return model, tokenizer
