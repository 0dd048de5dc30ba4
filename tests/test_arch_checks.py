"""LM and vision-tower architectures Flamingo cannot serve as asked: each is refused with an error naming what is
missing, or handled by what it really computes (which decoder layers, which packed rows, which features), never
built into a model that silently computes something else. Tiny random configs; an architecture the installed
transformers lacks is skipped."""

from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from flamingo.build import from_backbones, load_pretrained
from flamingo.model import backbones
from flamingo.model.backbones import find_decoder_layers, load_vision_tower, vision_features
from flamingo.tiny import (
    random_image,
    set_gates,
    tiny_flamingo,
    tiny_flamingo_config,
    tiny_image_processor,
    tiny_lm,
    tiny_tokenizer,
    tiny_vision,
)

SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8
)


def causal_lm(model_type: str, vocab_size: int, **config: Any) -> torch.nn.Module:
    """A random causal LM of `model_type` (eval mode), or a skip where this transformers cannot build it."""
    try:
        cfg = AutoConfig.for_model(
            model_type, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=None, **config
        )
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).eval()
    except (KeyError, ValueError, ImportError) as e:  # unknown model type, or its kernels missing
        pytest.skip(f"transformers cannot build a tiny {model_type}: {e}")


def flamingo_on(model_type: str, **config: Any) -> tuple:
    """A tiny Flamingo (CLIP tower, gates 0.5) on a random LM of `model_type`."""
    tok = tiny_tokenizer()
    lm = causal_lm(model_type, len(tok), **config)
    torch.manual_seed(1)
    model, processor = from_backbones(
        tiny_vision("clip"), lm, tok, tiny_flamingo_config(), image_processor=tiny_image_processor("clip")
    )
    set_gates(model, 0.5)
    return model.eval(), processor


# ------------------------------------------------------------------------------------------ scoring
def test_score_refuses_an_lm_whose_cache_is_not_attention_kv():
    """Mamba's cache holds conv and SSM states, which transformers selects no rows of: score names the layer class
    instead of failing inside transformers. Candidates of one token need no cache and are scored."""
    model, processor = flamingo_on("mamba", hidden_size=32, num_hidden_layers=4, state_size=4, expand=2)
    batch = processor("<image>A photo of", images=[random_image(0)])
    media = {"images": batch["images"], "num_media": batch["num_media"]}
    # transformers 5's cache layers; 4.x returns its cache elsewhere (cache_params) and None as the KV cache
    refusal = r"needs attention K/V: this LM('s cache has \['LinearAttentionLayer'\] layers| returned \w+ as its cache)"
    with pytest.raises(ValueError, match=refusal):
        model.score(batch["input_ids"], [[40, 41], [42]], **media)
    assert model.score(batch["input_ids"], [[40], [42]], **media).shape == (2,)


# ------------------------------------------------------------------------------------------ packed rows
LEAKY_PACKERS = {  # XGLM's mask ignores restarting positions; RecurrentGemma's recurrence carries state across them
    "xglm": dict(d_model=32, num_layers=4, attention_heads=4, ffn_dim=64),
    "recurrent_gemma": dict(SMALL, lru_width=32, block_types=["recurrent", "attention"], attention_window_size=8),
}


@pytest.mark.parametrize("model_type", sorted(LEAKY_PACKERS))
def test_packed_rows_are_refused_for_an_lm_whose_samples_see_each_other(model_type):
    """The second sample of a packed row must not depend on the first: the probe compares it after two different
    first samples (same restarted positions), which the position shift of an unrestarted row could hide."""
    model, processor = flamingo_on(model_type, **LEAKY_PACKERS[model_type])
    ids = model._plain_token_ids(14)  # (1, 14)
    restart = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        second = [
            model.lm(input_ids=row, position_ids=restart, use_cache=False).logits[:, 5:]
            for row in (ids[:, :9], torch.cat([ids[:, 9:], ids[:, 5:9]], dim=1))
        ]
    assert (second[0] - second[1]).abs().max() > 1e-5  # the LM really leaks the first sample into the second
    assert not model._lm_packs_exactly()
    a = processor("<image>Caption: a red", images=[random_image(1)])
    b = processor("<image>two dogs on the mat", images=[random_image(2)])
    document_ids = torch.cat([torch.zeros_like(a["input_ids"]), torch.ones_like(b["input_ids"])], dim=1)
    with pytest.raises(ValueError, match="does not keep packed samples apart"):
        model(
            torch.cat([a["input_ids"], b["input_ids"]], dim=1),
            images=torch.cat([a["images"], b["images"]], 1),
            num_media=torch.tensor([2]),
            document_ids=document_ids,
        )


# ------------------------------------------------------------------------------------------ decoder layers
class _Adapters(nn.Module):  # an MLP holding a ModuleList of its own (Zamba2's shared MLP: LoRA adapters)
    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))


class _AttentionLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _Adapters()


class _StateSpaceLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = nn.Linear(8, 8)


class _ToyHybridLM(nn.Module):
    """A hybrid LM's module tree: a layer list of two classes, other lists beside and inside it."""

    def __init__(self, num_hidden_layers: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=num_hidden_layers)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_AttentionLayer() if i % 2 else _StateSpaceLayer() for i in range(layers))
        self.model.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(2))  # uniform, but not the layer count


def test_decoder_layers_are_the_list_of_the_configs_length_even_when_mixed():
    assert find_decoder_layers(_ToyHybridLM()) == "model.layers"
    with pytest.raises(ValueError, match=r"no nn.ModuleList has the config's layer count \({'num_hidden_layers': 6}"):
        find_decoder_layers(_ToyHybridLM(num_hidden_layers=6))  # not the 2-entry lists


def test_zamba2s_decoder_layers_are_its_hybrid_layer_list():
    """Zamba2's layers mix Mamba and hybrid layers; its shared MLP holds a 2-entry adapter list, not the layers."""
    lm = causal_lm(
        "zamba2",
        300,
        **dict(
            SMALL,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
            mamba_d_state=4,
            mamba_headdim=8,
            n_mamba_heads=8,
            num_mem_blocks=1,
        ),
    )
    assert find_decoder_layers(lm) == "model.layers"


def test_xlm_is_refused_for_its_parallel_per_layer_lists():
    lm = causal_lm("xlm", 300, emb_dim=32, n_layers=4, n_heads=4)
    with pytest.raises(ValueError, match="XLMWithLMHeadModel cannot take cross-attention blocks: .* parallel"):
        find_decoder_layers(lm)


# ------------------------------------------------------------------------------------------ vision towers
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8)


def _tower(kind: str) -> nn.Module:
    configs = {  # (config class, model class, config fields): 32 px inputs, a 4 x 4 grid of patches
        "dinov2_518": ("Dinov2Config", "Dinov2Model", dict(image_size=64)),  # the Hub's: config 518, crops 224
        "dinov2_registers": (
            "Dinov2WithRegistersConfig",
            "Dinov2WithRegistersModel",
            dict(image_size=32, num_register_tokens=4),
        ),
        "deit": ("DeiTConfig", "DeiTModel", dict(image_size=32)),
        "clip": ("CLIPVisionConfig", "CLIPVisionModel", dict(image_size=32)),
        "siglip": ("SiglipVisionConfig", "SiglipVisionModel", dict(image_size=32)),
    }
    config_name, model_name, fields = configs[kind]
    if not hasattr(transformers, model_name):
        pytest.skip(f"this transformers has no {model_name}")
    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**TOWER, **fields)).eval()


@pytest.mark.parametrize(
    "kind, prefix", [("dinov2_518", 1), ("dinov2_registers", 5), ("deit", 2), ("clip", 1), ("siglip", 0)]
)
def test_drop_cls_token_drops_every_token_before_the_patch_grid_of_the_input(kind, prefix):
    """CLS, registers and DeiT's distillation token go (counted from the input's 4 x 4 grid, not the config's
    image_size), SigLIP keeps all 16; without drop_cls the whole output."""
    tower, pixels = _tower(kind), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = tower(pixel_values=pixels).last_hidden_state
        assert whole.shape[1] == 16 + prefix
        assert torch.equal(vision_features(tower, pixels), whole[:, prefix:])
        assert torch.equal(vision_features(tower, pixels, drop_cls=False), whole)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("Siglip2VisionModel", r"needs \['pixel_attention_mask', 'spatial_shapes'\] besides pixel_values"),
        ("ViTMAEModel", r"drops \(mask_ratio=0.75\) and shuffles its patches at random"),
    ],
)
def test_towers_that_cannot_encode_pixel_values_alone_the_same_each_call_are_refused(kind, message):
    if not hasattr(transformers, kind):
        pytest.skip(f"this transformers has no {kind}")
    config_class = getattr(transformers, kind.replace("Model", "Config"))
    fields = dict(num_patches=16) if kind.startswith("Siglip2") else dict(image_size=32)
    tower = getattr(transformers, kind)(config_class(**TOWER, **fields)).eval()
    with pytest.raises(ValueError, match=message):
        load_vision_tower(tower)
    if kind.startswith("Siglip2"):  # its dual encoder's vision half too (on transformers 4: a wrapper built here)
        dual = transformers.Siglip2Model(transformers.Siglip2Config(
            vision_config={**TOWER, **fields}, text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                                 num_attention_heads=2, intermediate_size=37)))
        with pytest.raises(ValueError, match=r"besides pixel_values: .*NaFlex towers"):  # (mask's name varies)
            load_vision_tower(dual.eval())
    for accepted in ("clip", "siglip", "dinov2_registers", "deit"):
        assert load_vision_tower(_tower(accepted)) is not None


def test_a_vision_tower_automodel_cannot_map_saves_and_loads_back(tmp_path):
    """A full save stores the tower's own config; BLIP's standalone vision model (OWL-ViT's, AltCLIP's: what their
    dual encoders give) has no AutoModel entry, so the saved model could not be loaded back (found after training).
    It loads by the class its config names: the same logits."""
    from transformers import BlipVisionConfig, BlipVisionModel, ViTImageProcessor

    tok = tiny_tokenizer()
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=32, patch_size=8)).eval()
    model, processor = from_backbones(vision, tiny_lm("llama", vocab_size=len(tok)), tok, tiny_flamingo_config(),
                                      image_processor=ViTImageProcessor(size={"height": 32, "width": 32}))
    set_gates(model, 0.5)
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    loaded, loaded_processor = load_pretrained(str(tmp_path / "m"))
    batch = processor("<image>A photo of", images=[random_image(0)])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, model(**batch).logits)
    assert type(loaded.vision) is BlipVisionModel


def test_towers_and_lms_a_block_cannot_read_are_refused_clearly(monkeypatch):
    """A tower that packs every image into one sequence (Pixtral's) failed inside torch's index_copy at the second
    image; Gemma 3n's decoder layers take stacked residual streams (AltUp) and failed later with a message about
    `inputs_embeds`; an override naming no layer list gave a bare TypeError. Each is a ValueError naming the cause."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, ViTImageProcessor

    tok = tiny_tokenizer()
    pixtral = AutoModel.from_config(AutoConfig.for_model(
        "pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, head_dim=8)).eval()
    model, processor = from_backbones(pixtral, tiny_lm("llama", vocab_size=len(tok)), tok, tiny_flamingo_config(),
                                      image_processor=ViTImageProcessor(size={"height": 32, "width": 32}))
    batch = processor("<image>A photo of<|endofchunk|><image>two", images=[random_image(0), random_image(1)])
    with pytest.raises(ValueError, match="PixtralVisionModel returned 1 rows for 2 frames"):
        model(**batch)

    tok = tiny_tokenizer()
    gemma3n = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma3n_text", vocab_size=len(tok), bos_token_id=0, eos_token_id=0, pad_token_id=None, hidden_size=32,
        intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=len(tok), num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=4, laurel_rank=4, altup_num_inputs=2,
        activation_sparsity_pattern=[0.0] * 4))
    with pytest.raises(ValueError, match="Gemma3nForCausalLM cannot take cross-attention blocks: .*AltUp"):
        from_backbones(tiny_vision(), gemma3n, tok, tiny_flamingo_config(xattn_every=2),
                       image_processor=tiny_image_processor())

    for path, named in (("model.norm", "LlamaRMSNorm"), ("model.layerz", "nothing")):
        monkeypatch.setitem(backbones.DECODER_LAYERS_OVERRIDES, "llama", path)
        with pytest.raises(ValueError, match=f"DECODER_LAYERS_OVERRIDES\\['llama'\\] = '{path}' names {named}"):
            tiny_flamingo("llama")
