"""Refusals of the model's build / save / load paths, each before any work is lost or wasted: a trained-only save
that could not load back, a model saved without its processor, a dtype name, a config field of the wrong type or
range, a tokenizer already holding Flamingo's tokens past the LM's table; and the generation invariants (pad id,
suppressed tokens) whoever builds the generation config."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import pytest
import torch
from transformers import GenerationConfig

from flamingo import Flamingo, from_backbones, load_pretrained
from flamingo.config import CONFIG_NAME, FlamingoConfig
from flamingo.model.card import model_card
from flamingo.model.flamingo import unresolved_backbones
from flamingo.model.generation import generation_config_for
from flamingo.runtime.lru import LRU
from flamingo.tiny import (
    random_image,
    tiny_flamingo,
    tiny_flamingo_config,
    tiny_image_processor,
    tiny_lm,
    tiny_tokenizer,
    tiny_vision,
)

PROMPT = "<image>Question: what? Short answer:"


def _backbones(root) -> tuple[str, str]:
    tok = tiny_tokenizer()
    vision, lm = os.path.join(root, "vision_src"), os.path.join(root, "lm_src")
    tiny_lm("llama", vocab_size=len(tok)).save_pretrained(lm)
    tok.save_pretrained(lm)
    tiny_vision("clip").save_pretrained(vision)
    tiny_image_processor("clip").save_pretrained(vision)
    return vision, lm


# ------------------------------------------------------------------------------------ trained-only saves
def test_a_trained_only_save_whose_backbones_are_gone_is_refused_and_keeps_the_full_checkpoint(tmp_path):
    """A full checkpoint keeps its builder's backbone paths: once they are gone (a copied or downloaded checkpoint),
    saving it trained-only over itself deleted `vision/` and `lm/`, the only copy of the backbones."""
    vision, lm = _backbones(tmp_path / "alice")
    model, processor = from_backbones(vision, lm, config=tiny_flamingo_config())
    full = str(tmp_path / "full")
    model.save_pretrained(full, processor=processor)
    assert unresolved_backbones(model.config) == []
    shutil.rmtree(tmp_path / "alice")
    loaded, _ = load_pretrained(full)
    assert unresolved_backbones(loaded.config) == [f"vision_name_or_path {vision!r}", f"lm_name_or_path {lm!r}"]
    with pytest.raises(ValueError, match="neither a directory here nor a Hub name.*save the full model"):
        loaded.save_pretrained(full, trained_only=True)
    assert os.path.isdir(os.path.join(full, "vision")) and os.path.isdir(os.path.join(full, "lm"))
    loaded.save_pretrained(str(tmp_path / "again"))  # the full save still works
    hub_named = FlamingoConfig(vision_name_or_path="org/clip", lm_name_or_path="org/llama")
    assert unresolved_backbones(hub_named) == []  # a Hub name is not looked up


def test_a_trained_only_save_of_quantized_changed_backbone_weights_is_refused(tmp_path):
    """A merged LoRA's LM weights are listed in extra_saved_weights; quantized, safetensors crashed on them."""
    pytest.importorskip("torchao")
    from flamingo.model import quantize

    vision, lm = _backbones(tmp_path)
    model, _ = from_backbones(vision, lm, config=tiny_flamingo_config(lm_lora={"r": 4}))
    model.merge_lora()
    quantize.quantize_frozen(model, "int8")
    with pytest.raises(ValueError, match=r"extra_saved_weights.*are quantized: save before quantizing"):
        model.save_pretrained(str(tmp_path / "out"), trained_only=True)
    assert not os.path.exists(tmp_path / "out")


def test_loading_with_quantize_frozen_logs_what_was_quantized(tmp_path, caplog):
    pytest.importorskip("torchao")
    vision, lm = _backbones(tmp_path)
    model, processor = from_backbones(vision, lm, config=tiny_flamingo_config())
    model.save_pretrained(str(tmp_path / "m"), trained_only=True, processor=processor)
    with caplog.at_level(logging.INFO, logger="flamingo.model.flamingo"):
        Flamingo.from_pretrained(str(tmp_path / "m"), quantize_frozen="int8")
    (line,) = [r.getMessage() for r in caplog.records if "quantize_frozen=int8" in r.getMessage()]
    assert "linear layers quantized" in line and "MiB" in line


# ------------------------------------------------------------------------------------ loading
def test_a_model_saved_without_its_processor_is_refused_before_its_weights_load(tmp_path, monkeypatch):
    model, _ = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "m"))  # processor=None, the default

    def never(*args, **kwargs):
        raise AssertionError("the weights were read before the processor was found missing")

    monkeypatch.setattr(Flamingo, "from_pretrained", never)
    with pytest.raises(ValueError, match="saved without its processor.*processor=processor"):
        load_pretrained(str(tmp_path / "m"))


@pytest.mark.parametrize("name,dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                        ("bf16", torch.bfloat16), ("auto", torch.float32)])
def test_a_dtype_name_loads_in_that_dtype(tmp_path, name, dtype):
    """transformers takes names ("bfloat16", "auto"): they reached `model.to`, which read them as devices."""
    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    loaded = Flamingo.from_pretrained(str(tmp_path / "m"), torch_dtype=name)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    with pytest.raises(ValueError, match="torch_dtype 'bfloat' is not a dtype name"):
        Flamingo.from_pretrained(str(tmp_path / "m"), torch_dtype="bfloat")
    with pytest.raises(ValueError, match="floating torch.dtype"):
        Flamingo.from_pretrained(str(tmp_path / "m"), torch_dtype=torch.int8)


def test_from_backbones_takes_a_dtype_name(tmp_path):
    vision, lm = _backbones(tmp_path)
    model, _ = from_backbones(vision, lm, config=tiny_flamingo_config(), torch_dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="not a dtype name"):
        from_backbones(vision, lm, config=tiny_flamingo_config(), torch_dtype="half-ish")


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("fields,message", [
    ({"xattn_norm_eps": math.nan}, "xattn_norm_eps must be a finite number > 0"),
    ({"lm_lora": {"r": 4, "alpha": math.nan}}, "lm_lora.alpha must be a finite number"),
    ({"lm_lora": {"r": 4, "alpha": math.inf}}, "lm_lora.alpha must be a finite number"),
    ({"freeze_lm": "false"}, "freeze_lm must be true or false"),
    ({"xattn_every": 2.5}, "xattn_every must be an integer >= 1"),
    ({"xattn_every": "2"}, "xattn_every must be an integer >= 1"),
    ({"xattn_heads": 0}, "xattn_heads must be an integer >= 1"),
    ({"ffw_mult": 0}, "ffw_mult must be an integer >= 1"),
    ({"resampler_depth": -3}, "resampler_depth must be an integer >= 1"),
    ({"num_latents": 8.5}, "num_latents must be an integer >= 1"),
    ({"num_image_references": -1}, "num_image_references must be an integer >= 0"),
    ({"media_token_id": "301"}, "media_token_id must be a token id"),
    ({"xattn_layers": [0, 2.0]}, "xattn_layers must be a list of layer indices"),
    ({"xattn_layers": 5}, "xattn_layers must be a list of layer indices"),
    ({"extra_saved_weights": 5}, "extra_saved_weights must be a list of tensor names"),
    ({"gated": 1}, "gated must be true or false"),
    # an option of the other variant, which would be ignored
    ({"xattn_qk_norm": True}, r"xattn_qk_norm=True set an option of block='idefics'"),
    ({"xattn_ffw_dim": 64, "xattn_norm_eps": 1e-5}, r"xattn_ffw_dim=64, xattn_norm_eps=1e-05 set an option of block"),
    ({"resampler": "mlp", "resampler_ffw_act": "relu"}, r"resampler_ffw_act='relu' set an option of "
                                                        "resampler='perceiver'"),
])
def test_a_config_field_of_the_wrong_type_or_range_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        FlamingoConfig(**fields)


def test_a_vision_feature_layer_past_the_towers_layers_is_refused_when_the_model_is_built():
    """It built, and failed with an IndexError inside the tower's hidden states at the first forward."""
    with pytest.raises(ValueError, match="vision_feature_layer=99 is outside the vision tower's"):
        tiny_flamingo(vision_feature_layer=99)
    tiny_flamingo(vision_feature_layer=-2)  # a layer the tower has


def test_a_config_is_never_saved_nor_loaded_with_nan(tmp_path):
    config = FlamingoConfig(media_token_id=5)
    config.xattn_norm_eps = math.nan  # set after the checks ran
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        config.save(str(tmp_path / "a"))
    FlamingoConfig(media_token_id=5).save(str(tmp_path / "b"))
    path = tmp_path / "b" / CONFIG_NAME
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "lm_lora": {"r": 4, "alpha": math.nan}}))  # edited by hand
    with pytest.raises(ValueError, match="it holds NaN, which no FlamingoConfig field takes"):
        FlamingoConfig.load(str(tmp_path / "b"))


# ------------------------------------------------------------------------------------ build
def test_a_tokenizer_already_holding_flamingos_tokens_past_the_lms_table_is_refused(tmp_path):
    """The tokenizer saved beside a Flamingo model holds `<image>` past the base LM's rows: nothing was added, so the
    model had no row for it and failed at its first forward."""
    _, processor = tiny_flamingo()
    processor.tokenizer.save_pretrained(tmp_path / "flamingo_tok")
    lm = tiny_lm("llama", vocab_size=len(tiny_tokenizer()))
    with pytest.raises(ValueError, match=r"already holds <image> at id 301, past the LM's 300 embedding "
                                         r"rows.*pass the LM's own tokenizer"):
        from_backbones(tiny_vision("clip"), lm, str(tmp_path / "flamingo_tok"), tiny_flamingo_config(),
                       image_processor=tiny_image_processor("clip"))


# ------------------------------------------------------------------------------------ generation invariants
def _with_own_pad(num_image_references: int = 0):
    """A model whose tokenizer had a pad token before the build (pad = EOS, as often set), so none was added."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    return from_backbones(tiny_vision("clip"), tiny_lm("llama", vocab_size=len(tok)), tok,
                          tiny_flamingo_config(num_image_references=num_image_references),
                          image_processor=tiny_image_processor("clip"))


@pytest.mark.parametrize("refs", [0, 2])
def test_the_generation_pad_id_is_the_tokenizers_never_a_flamingo_token(refs):
    model, processor = _with_own_pad(refs)
    assert model.config.pad_token_id == processor.tokenizer.pad_token_id
    pad = generation_config_for(model).pad_token_id
    assert pad == processor.tokenizer.pad_token_id and pad != model.config.media_token_id
    model.config.pad_token_id = None  # a config saved before the pad id was recorded: the LM's EOS
    assert generation_config_for(model).pad_token_id == processor.tokenizer.eos_token_id
    model.config.pad_token_id = model.config.media_token_id  # never <image>, whatever was recorded
    assert generation_config_for(model).pad_token_id == processor.tokenizer.eos_token_id


def test_a_prompt_starting_with_image_is_not_read_as_padding():
    from flamingo.model.generation import prompt_mask

    model, processor = _with_own_pad()
    batch = processor(PROMPT, images=[random_image(0)])
    assert batch["input_ids"][0, 0] == model.config.media_token_id
    assert prompt_mask(model, batch["input_ids"], None, "generate").all()
    with_mask = model.generate(**batch, max_new_tokens=3)
    without = model.generate(batch["input_ids"], images=batch["images"], max_new_tokens=3)
    assert torch.equal(with_mask, without)


def test_a_callers_generation_config_gets_the_image_and_beam_reference_suppression(monkeypatch):
    model, processor = tiny_flamingo(num_image_references=2)
    first, n = model.references
    seen = []
    generate = type(model.lm).generate

    def spy(self, *args, generation_config=None, **kwargs):
        seen.append(list(generation_config.suppress_tokens or []))
        return generate(self, *args, generation_config=generation_config, **kwargs)

    monkeypatch.setattr(type(model.lm), "generate", spy)
    processor.image_references = True
    batch = processor("Image 0 is <image0>. What?", images=[random_image(0)])
    model.generate(**batch, generation_config=generation_config_for(model), num_beams=2, max_new_tokens=2)
    model.generate(**batch, generation_config=GenerationConfig(num_beams=2, max_new_tokens=2))
    model.generate(**batch, generation_config=GenerationConfig(max_new_tokens=2))  # greedy: references allowed
    media, refs = model.config.media_token_id, set(range(first, first + n))
    assert media in seen[0] and refs <= set(seen[0])
    assert media in seen[1] and refs <= set(seen[1])
    assert media in seen[2] and not refs & set(seen[2])


# ------------------------------------------------------------------------------------ card, LRU
def test_the_card_prose_follows_the_config(tmp_path):
    model, processor = tiny_flamingo(freeze_lm=False, freeze_vision=False, resampler="mlp", gated=False)
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    text = " ".join(model_card(str(tmp_path / "m"), "m").split())
    assert "a trained vision tower" in text and "an MLP resampler" in text
    assert "cross-attention blocks (ungated) inserted into a trained causal LM" in text
    assert "frozen" not in text.split("|")[0] and "Perceiver" not in text.split("|")[0]


def test_an_lru_replacing_a_key_evicts_the_old_value_even_when_the_new_one_is_too_large():
    left = []
    store = LRU(3, size_of=len, on_evict=left.append)
    store.put("a", "xx")
    store.put("a", "yy")
    assert left == ["xx"] and store.peek("a") == "yy" and store.size == 2
    value = store.peek("a")
    store.put("a", value)  # the same object again: stays, nothing leaves
    assert left == ["xx"] and store.size == 2
    store.put("a", "zzzz")  # over the budget: not stored, and the stale value leaves
    assert left == ["xx", "yy"] and "a" not in store and store.size == 0


def test_a_saved_config_with_an_unread_option_of_the_other_variant_still_loads(tmp_path, caplog):
    """A config now refuses `xattn_norm_eps` on a flamingo block; a model saved with one (which its block never read)
    loads as it computed, the option dropped with a warning naming the file. A field's error names the file too."""
    model, processor = tiny_flamingo(gates=0.5)
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    path = tmp_path / "m" / CONFIG_NAME
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "xattn_norm_eps": 1e-5, "resampler_ffw_act": "relu"}))
    with caplog.at_level(logging.WARNING, logger="flamingo.config"):
        config = FlamingoConfig.load(str(tmp_path / "m"))
    assert config.xattn_norm_eps == 1e-6 and config.resampler_ffw_act == "relu"  # (perceiver: relu is read)
    assert "xattn_norm_eps=1e-05 is an option of another block" in caplog.text and CONFIG_NAME in caplog.text
    path.write_text(json.dumps({**saved, "freeze_lm": 3.5}))
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}': freeze_lm must be true or false, got 3.5"):
        FlamingoConfig.load(str(tmp_path / "m"))


def test_backbones_already_in_a_flamingo_are_refused_by_the_next_one():
    """Running a notebook cell again on the backbone objects of an earlier cell: the second model shared (and hooked
    again) the first's LM, so both ran each other's blocks, none could be freed, and the tokenizer the first had grown
    gave it no `<image>` rows to train. The LM is refused, naming the remedy."""
    from flamingo import from_backbones
    from flamingo.tiny import tiny_flamingo_config, tiny_image_processor, tiny_lm, tiny_tokenizer, tiny_vision

    tok, vision = tiny_tokenizer(), tiny_vision()
    lm = tiny_lm("llama", vocab_size=len(tok))
    first, _ = from_backbones(vision, lm, tok, tiny_flamingo_config(), image_processor=tiny_image_processor())
    hooks = len(lm.get_input_embeddings()._forward_hooks)
    with pytest.raises(ValueError, match="this LM already belongs to a Flamingo model"):
        from_backbones(vision, lm, tok, tiny_flamingo_config(), image_processor=tiny_image_processor())
    with pytest.raises(ValueError, match="this LM already belongs to a Flamingo model"):
        from_backbones(vision, lm, tiny_tokenizer(), tiny_flamingo_config(), image_processor=tiny_image_processor())
    assert len(lm.get_input_embeddings()._forward_hooks) == hooks and first.config.num_new_tokens == 3


def test_a_model_whose_constructor_failed_leaves_its_lm_free():
    """The constructor hooked the LM before a config check raised: the half-built model then 'owned' the LM, and the
    corrected retry on it was refused as another model's. Every check runs before the hooks."""
    import dataclasses

    from flamingo.tiny import tiny_flamingo_config, tiny_lm, tiny_tokenizer, tiny_vision

    tok = tiny_tokenizer()
    lm, vision = tiny_lm("llama", vocab_size=len(tok) + 4), tiny_vision("clip")
    bad = tiny_flamingo_config(num_image_references=2, media_token_id=len(tok), end_of_chunk_token_id=len(tok) + 1)
    with pytest.raises(ValueError, match="needs config.first_reference_token_id"):
        Flamingo(vision, lm, bad)
    assert Flamingo(vision, lm, dataclasses.replace(bad, num_image_references=0)).lm is lm
