"""`FlamingoConfig`: the hyper-parameters of the trained parts and the paper's ablation switches, saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

CONFIG_NAME = "flamingo_config.json"
WEIGHTS_NAME = "flamingo.safetensors"  # the tensors stored beside the backbones (model/flamingo.py)
BACKBONE_DIRS = ("vision", "lm")  # a model saved whole: its backbones, each an HF directory
PROCESSOR_CONFIG_NAME = "flamingo_processor.json"  # the processor's settings and prompt template (processing.py)
# what a processor's `save_pretrained` writes: its settings, the tokenizer's and the image processor's files
PROCESSOR_FILES = (PROCESSOR_CONFIG_NAME, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "processor_config.json", "video_preprocessor_config.json")
# the config of the run that wrote a trained model (`flamingo train` writes it into `final/`)
TRAIN_CONFIG_NAME = "train_config.json"
MEDIA_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
IDEFICS_IMAGE_WRAPPER = "<fake_token_around_image>"  # IDEFICS writes each <image> between two
END_OF_UTTERANCE = "<end_of_utterance>"  # IDEFICS's end of a dialogue turn (its instruct models' tokenizers hold it)
QUANTIZE_MODES = ("none", "int8", "int4", "nf4")
log = logging.getLogger(__name__)


def lora_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """`lm_lora` with its defaults filled in and checked: r (required), alpha (default r: scale 1), target_modules
    (default q_proj, v_proj: Llama-style names) and dropout (default 0)."""
    if not isinstance(spec, dict):
        raise ValueError(f"lm_lora must be a mapping {{r, alpha, target_modules, dropout}}, got {spec!r}")
    unknown = set(spec) - {"r", "alpha", "target_modules", "dropout"}
    if unknown:
        raise ValueError(f"unknown lm_lora keys {sorted(unknown)} (known: r, alpha, target_modules, dropout)")
    r = spec.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"lm_lora.r must be an integer >= 1, got {r!r}")
    alpha = spec.get("alpha", r)
    if not _positive_number(alpha):
        raise ValueError(f"lm_lora.alpha must be a finite number > 0, got {alpha!r}")
    targets = spec.get("target_modules", ["q_proj", "v_proj"])
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"lm_lora.target_modules must be a non-empty list of module names, got {targets!r}")
    dropout = spec.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lm_lora.dropout must be in [0, 1), got {dropout!r}")
    return {"r": r, "alpha": alpha, "target_modules": list(targets), "dropout": float(dropout)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_number(value: Any) -> bool:
    """A finite number > 0 (an int or float; not a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


class NonFiniteValue(ValueError):
    """JSON's non-standard NaN / Infinity in a saved config: no field takes one."""


def _refuse_constant(name: str) -> Any:
    raise NonFiniteValue(f"it holds {name}, which no FlamingoConfig field takes (edited by hand?)")


# the options only one variant of the block or the resampler has, with their defaults (FlamingoConfig's)
_IDEFICS_BLOCK_OPTIONS = {"xattn_qk_norm": False, "xattn_ffw_dim": None, "xattn_norm_eps": 1e-6}
_PERCEIVER_OPTIONS = {"resampler_qk_norm": False, "resampler_ffw_act": "gelu"}


@dataclass
class FlamingoConfig:
    # Cross-attention placement: a GATED XATTN-DENSE block runs before LM layer i when (i + 1) % xattn_every == 0
    # (OpenFlamingo's convention). The paper's ablation compares 1, 2 and 4.
    xattn_every: int = 1
    # Explicit placement: the LM layers that get a block before them (overrides xattn_every), e.g. IDEFICS's
    # 0, k, 2k, ... (`idx % cross_layer_interval == 0`).
    xattn_layers: Optional[list[int]] = None
    # "flamingo": the paper's / OpenFlamingo's block (LayerNorm, GELU FFW of ffw_mult). "idefics": IDEFICS's (RMSNorm,
    # optional q/k RMSNorm per head, gated SiLU MLP of xattn_ffw_dim; model/idefics_block.py).
    block: Literal["flamingo", "idefics"] = "flamingo"
    xattn_qk_norm: bool = False  # "idefics" block: RMSNorm on each head's queries and keys
    xattn_ffw_dim: Optional[int] = None  # "idefics" block: the MLP's hidden width (IDEFICS: the LM's intermediate)
    xattn_norm_eps: float = 1e-6  # "idefics" block: the RMSNorms' epsilon
    xattn_heads: int = 8
    xattn_head_dim: int = 64
    # Hidden width multiplier of the feed-forwards (xattn-dense and resampler).
    ffw_mult: int = 4
    # Perceiver Resampler: R latent queries, depth and attention shape. Works at the vision tower's width.
    num_latents: int = 64
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_head_dim: int = 64
    # "perceiver" (the paper's) or "mlp" (ablation: time embeddings, pool to R tokens, residual MLP).
    resampler: Literal["perceiver", "mlp"] = "perceiver"
    resampler_qk_norm: bool = False  # LayerNorm on each head's queries and keys (IDEFICS's qk_layer_norms_perceiver)
    resampler_ffw_act: Literal["gelu", "relu"] = "gelu"  # the resampler FFW's activation (IDEFICS: ReLU)
    # Number of learned frame (time) embeddings: videos longer than this are sub-sampled by the processor.
    max_frames: int = 8
    # True: a token sees only the last image at or before it (the paper). False: all images before it.
    only_attend_last_image: bool = True
    # OpenFlamingo v1's rule at inference (its `attend_previous=False`; OpenFlamingo-9B v1 and Med-Flamingo were
    # trained and evaluated with it): a text token sees the next image of its row, none after the row's last image;
    # an `<image>` token sees its own. For converted v1 checkpoints; False is the paper's rule.
    attend_next_image: bool = False
    # A row without any image skips the blocks (computes the bare LM, adapters included), as Multimodal-GPT's
    # text-only prompts do; False: every row runs the blocks (Flamingo's rule: the attention term of text that sees
    # no image is zero, the gated FFW still applies). For converted Multimodal-GPT checkpoints.
    imageless_rows_skip_blocks: bool = False
    # MMICL-style references: `<image0>` ... `<imageK-1>` tokens (K = this) that re-target the cross-attention to an
    # earlier image of the prompt (flamingo/references.py); 0: none, the paper's model.
    num_image_references: int = 0
    # Hidden state of the vision tower to use: -1 = its final output (last_hidden_state), i = hidden_states[i].
    vision_feature_layer: int = -1
    # Drop the tower's CLS token when it has one (CLIP, ViT; SigLIP has none). The resampler wants patch features.
    drop_cls_token: bool = True
    # Ablations: tanh gating (False: plain residual, the "no gating" row of the paper), frozen LM / vision tower.
    gated: bool = True
    # "scalar": one tanh gate per block and branch (the paper, OpenFlamingo). "vector": one per LM hidden channel, all
    # starting at 0 (IDEFICS's alpha_type="vector"). Each channel opens or stays shut on its own, so an attention
    # block is not lost when a single scalar gate wanders around 0 (docs/demo.md has the measurements).
    gate_type: Literal["scalar", "vector"] = "scalar"
    freeze_lm: bool = True
    freeze_vision: bool = True
    # Storage of the frozen backbones' linear weights: "none" (their dtype), "int8", "int4" (CUDA) or "nf4", weight-only
    # (model/quantize.py, docs/memory.md). Applied once the model is on its device; needs both backbones frozen.
    quantize_frozen: Literal["none", "int8", "int4", "nf4"] = "none"
    # LoRA adapters on the frozen LM, trained with the blocks (model/lora.py, docs/memory.md): {r, alpha (default r),
    # target_modules (default [q_proj, v_proj]), dropout (default 0)}; None: no adapters.
    lm_lora: Optional[dict[str, Any]] = None
    # Filled in by `from_backbones`: which backbones to load back, and where the added tokens sit in the vocabulary.
    vision_name_or_path: Optional[str] = None
    lm_name_or_path: Optional[str] = None
    # The Hub commit a backbone named by its Hub name is loaded at, so that a trained-only checkpoint reads the same
    # weights after the repository moves on; None for a local path (which has no revisions), an in-memory model, or
    # a name whose commit is unknown (configs saved before commits were recorded: loading pins the default branch's).
    # `from_backbones` reads a branch or tag given here as the revision to load, and records its commit.
    vision_revision: Optional[str] = None
    lm_revision: Optional[str] = None
    media_token_id: Optional[int] = None
    end_of_chunk_token_id: Optional[int] = None
    # Added tokens are rows [first_new_token_id, first_new_token_id + num_new_tokens) of the LM's vocabulary; they
    # live in the model's own small trainable tables (the LM's table stays frozen).
    first_new_token_id: Optional[int] = None
    num_new_tokens: int = 0
    first_reference_token_id: Optional[int] = None  # `<image0>`; the others follow it
    # The tokenizer's pad id when the model was built: generation pads finished rows with it and reads a prompt's
    # padding off it. None (configs saved before it was recorded): generation falls back to the LM's EOS.
    pad_token_id: Optional[int] = None
    # Frozen backbone tensors that were changed after loading (e.g. an OpenFlamingo checkpoint's fine-tuned input
    # embedding) and so must be saved even in a trained-only checkpoint. Names are `Flamingo.state_dict()` keys.
    extra_saved_weights: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._check_types()
        if self.resampler not in ("perceiver", "mlp"):
            raise ValueError(f"resampler must be 'perceiver' or 'mlp', got {self.resampler!r}")
        if self.gate_type not in ("scalar", "vector"):
            raise ValueError(f"gate_type must be 'scalar' or 'vector', got {self.gate_type!r}")
        if self.block not in ("flamingo", "idefics"):
            raise ValueError(f"block must be 'flamingo' or 'idefics', got {self.block!r}")
        if self.block == "idefics" and not self.xattn_ffw_dim:
            raise ValueError("block='idefics' needs xattn_ffw_dim (the gated MLP's hidden width)")
        if self.resampler_ffw_act not in ("gelu", "relu"):
            raise ValueError(f"resampler_ffw_act must be 'gelu' or 'relu', got {self.resampler_ffw_act!r}")
        # an option of the other variant would be ignored, never silently: refused where it differs from its default
        unused = ([f"{name}={getattr(self, name)!r}" for name, default in _IDEFICS_BLOCK_OPTIONS.items()
                   if getattr(self, name) != default] if self.block == "flamingo" else [])
        if unused:
            raise ValueError(f"{', '.join(unused)} set an option of block='idefics', which the flamingo block does not "
                             "have: set block='idefics' or leave them out")
        unused = ([f"{name}={getattr(self, name)!r}" for name, default in _PERCEIVER_OPTIONS.items()
                   if getattr(self, name) != default] if self.resampler == "mlp" else [])
        if unused:
            raise ValueError(f"{', '.join(unused)} set an option of resampler='perceiver', which the mlp resampler "
                             "does not have: set resampler='perceiver' or leave them out")
        if self.xattn_layers is not None and (sorted(set(self.xattn_layers)) != list(self.xattn_layers)
                                              or min(self.xattn_layers, default=0) < 0):
            raise ValueError(f"xattn_layers must be distinct increasing layer indices, got {self.xattn_layers}")
        if self.quantize_frozen not in QUANTIZE_MODES:
            raise ValueError(f"quantize_frozen must be one of {', '.join(QUANTIZE_MODES)}: {self.quantize_frozen!r}")
        if self.quantize_frozen != "none" and not (self.freeze_lm and self.freeze_vision):
            raise ValueError(f"quantize_frozen={self.quantize_frozen} needs frozen backbones (freeze_lm and "
                             "freeze_vision true): a trained backbone keeps floating-point weights")
        if self.lm_lora is not None:
            self.lm_lora = lora_spec(self.lm_lora)
            if not self.freeze_lm:
                raise ValueError("lm_lora adapts a frozen LM: set freeze_lm true (or drop lm_lora to train it all)")
        if self.attend_next_image and (self.num_image_references or not self.only_attend_last_image):
            raise ValueError("attend_next_image (OpenFlamingo v1's rule) goes with only_attend_last_image=True and no "
                             "image references")
        if self.imageless_rows_skip_blocks and self.num_image_references:
            raise ValueError("imageless_rows_skip_blocks goes without image references")

    def _check_types(self) -> None:
        """Each field's type and range, before any is used: a wrong one would otherwise build a model that runs
        wrong (`freeze_lm: "false"` is truthy and keeps the LM frozen; `xattn_every: 2.5` places fewer blocks;
        `xattn_heads: 0` attends to nothing; a NaN epsilon gives NaN logits) or fail deep inside torch."""
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in _COUNTS:
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in _TOKEN_IDS:
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be a token id (an integer >= 0) or null, got {value!r}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.xattn_ffw_dim is not None and (not _is_int(self.xattn_ffw_dim) or self.xattn_ffw_dim < 1):
            raise ValueError(f"xattn_ffw_dim must be an integer >= 1 or null, got {self.xattn_ffw_dim!r}")
        if not _is_int(self.vision_feature_layer):
            raise ValueError(f"vision_feature_layer must be an integer, got {self.vision_feature_layer!r}")
        if not _positive_number(self.xattn_norm_eps):
            raise ValueError(f"xattn_norm_eps must be a finite number > 0, got {self.xattn_norm_eps!r}")
        if self.xattn_layers is not None and (not isinstance(self.xattn_layers, (list, tuple))
                                              or not all(_is_int(i) for i in self.xattn_layers)):
            raise ValueError(f"xattn_layers must be a list of layer indices, got {self.xattn_layers!r}")
        for name in ("vision_name_or_path", "lm_name_or_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string or null, got {getattr(self, name)!r}")
        for name in ("vision_revision", "lm_revision"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ValueError(f"{name} must be a Hub commit (or branch, tag) or null, got {value!r}")
        if not isinstance(self.extra_saved_weights, (list, tuple)) or \
                not all(isinstance(k, str) for k in self.extra_saved_weights):
            raise ValueError(f"extra_saved_weights must be a list of tensor names, got {self.extra_saved_weights!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlamingoConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown FlamingoConfig fields: {sorted(unknown)}")
        return cls(**d)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def load(cls, directory: str) -> "FlamingoConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: not a saved Flamingo model"
                                    + _what_else(directory))
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f, parse_constant=_refuse_constant)
        except NonFiniteValue as e:
            raise ValueError(f"{path!r}: {e}") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: a truncated or damaged file
            raise ValueError(f"{path!r} is not readable JSON (truncated or damaged?): {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path!r} holds a JSON {type(raw).__name__}, not an object of FlamingoConfig fields")
        try:
            config = cls.from_dict(_without_unread_options(raw, path))
        except ValueError as e:  # a field's check: the message names the field, this the file
            raise ValueError(f"{path!r}: {e}") from None
        if config.media_token_id is None:  # set when a model is built: without it the first call fails far away
            raise ValueError(f"{path!r} names no media_token_id: not a complete saved Flamingo config")
        return config

    def xattn_layer_indices(self, num_lm_layers: int) -> list[int]:
        """LM layer indices that get a GATED XATTN-DENSE block before them."""
        if self.xattn_layers is not None:
            beyond = [i for i in self.xattn_layers if i >= num_lm_layers]
            if beyond:
                raise ValueError(f"xattn_layers {beyond} lie beyond the LM's {num_lm_layers} layers")
            return list(self.xattn_layers)
        return [i for i in range(num_lm_layers) if (i + 1) % self.xattn_every == 0]


_TOLD: set[tuple[str, str]] = set()  # (file, option) pairs `_without_unread_options` has warned about


def _without_unread_options(raw: dict[str, Any], path: str) -> dict[str, Any]:
    """A saved config's fields without the options of the other block or resampler variant, which its model never
    read (a config now refuses them, `__post_init__`; a model saved with one loads as it always computed), each
    dropped with a warning."""
    unread = dict(_IDEFICS_BLOCK_OPTIONS) if raw.get("block", "flamingo") == "flamingo" else {}
    unread.update(_PERCEIVER_OPTIONS if raw.get("resampler", "perceiver") == "mlp" else {})
    dropped = {name: raw[name] for name, default in unread.items() if name in raw and raw[name] != default}
    for name, value in dropped.items():
        if (path, name) in _TOLD:  # a load reads the file more than once
            continue
        _TOLD.add((path, name))
        log.warning("%s: %s=%r is an option of another block or resampler variant than this model's, which never "
                    "read it: ignored (delete it from the file)", path, name, value)
    return {k: v for k, v in raw.items() if k not in dropped}


def _what_else(directory: str) -> str:
    """What a directory that is no saved Flamingo holds instead, as the end of that error: the model type its
    `config.json` names (an LM or a vision tower given where a Flamingo is expected), or nothing."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return ""
    if not isinstance(model_type, str):
        return ""
    return (f" (its config.json is an HF {model_type!r} model: build a Flamingo on an LM or vision tower with "
            "from_backbones; IDEFICS, Otter and OpenFlamingo checkpoints convert: docs/convert.md)")


# FlamingoConfig's fields by the check `_check_types` applies
_POSITIVE_INTS = ("xattn_every", "xattn_heads", "xattn_head_dim", "ffw_mult", "num_latents", "resampler_depth",
                  "resampler_heads", "resampler_head_dim", "max_frames")
_COUNTS = ("num_image_references", "num_new_tokens")
_TOKEN_IDS = ("media_token_id", "end_of_chunk_token_id", "first_new_token_id", "first_reference_token_id",
              "pad_token_id")
_BOOLS = ("xattn_qk_norm", "resampler_qk_norm", "only_attend_last_image", "attend_next_image",
          "imageless_rows_skip_blocks", "drop_cls_token", "gated", "freeze_lm", "freeze_vision")
