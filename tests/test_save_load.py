"""save -> load -> identical logits, for full and trained-only checkpoints; backbones by name/path."""

import os

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from flamingo import Flamingo, from_backbones, load_pretrained
from flamingo.model.backbones import load_vision_tower
from flamingo.tiny import (
    random_image,
    set_gates,
    tiny_flamingo_config,
    tiny_image_processor,
    tiny_lm,
    tiny_tokenizer,
    tiny_vision,
)

PROMPT = "<image>Question: what? Short answer: red.<|endofchunk|><image>Question: and this? Short answer:"


@pytest.fixture
def backbone_dirs(tmp_path):
    tok = tiny_tokenizer()
    lm_dir, vision_dir = tmp_path / "lm", tmp_path / "vision"
    tiny_lm("llama", vocab_size=len(tok)).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    tiny_vision("clip").save_pretrained(vision_dir)
    tiny_image_processor("clip").save_pretrained(vision_dir)
    return str(vision_dir), str(lm_dir)


def _trained_model(vision_dir, lm_dir, gate_type="scalar"):
    model, processor = from_backbones(vision_dir, lm_dir, config=tiny_flamingo_config(gate_type=gate_type))
    set_gates(model, 0.7)
    with torch.no_grad():  # as if trained: every trained tensor differs from its init
        for p in model.trainable_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), processor


@pytest.mark.parametrize("trained_only,gate_type", [(False, "scalar"), (True, "scalar"), (True, "vector")])
def test_save_load_identical_logits(backbone_dirs, tmp_path, trained_only, gate_type):
    model, processor = _trained_model(*backbone_dirs, gate_type=gate_type)
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    with torch.no_grad():
        before = model(**batch).logits
    out = tmp_path / "ckpt"
    model.save_pretrained(str(out), trained_only=trained_only, processor=processor)
    assert os.path.isdir(out / "lm") != trained_only
    assert not [f for f in os.listdir(out) if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    loaded, loaded_processor = load_pretrained(str(out))
    batch2 = loaded_processor(PROMPT, images=[random_image(0), random_image(1)])
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    with torch.no_grad():
        after = loaded(**batch2).logits
    assert torch.equal(before, after)
    assert loaded.config == model.config
    assert set(loaded.trainable_parameters()) == set(model.trainable_parameters())
    assert loaded.name_or_path == str(out) and model.name_or_path is None  # what an evaluation names it by


def test_from_pretrained_records_where_the_model_came_from(backbone_dirs, tmp_path):
    """`name_or_path`, as HF models have it: the directory (or Hub name) given, as a string; not saved with it."""
    model, processor = _trained_model(*backbone_dirs)
    model.save_pretrained(str(tmp_path / "ckpt"), trained_only=True, processor=processor)
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt")
    assert loaded.name_or_path == str(tmp_path / "ckpt")
    loaded.save_pretrained(str(tmp_path / "again"), trained_only=True)
    assert Flamingo.from_pretrained(str(tmp_path / "again")).name_or_path == str(tmp_path / "again")


def test_trained_only_checkpoint_holds_just_the_trained_tensors(backbone_dirs, tmp_path):
    from safetensors import safe_open

    model, processor = _trained_model(*backbone_dirs)
    model.save_pretrained(str(tmp_path / "small"), trained_only=True)
    with safe_open(str(tmp_path / "small" / "flamingo.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.trainable_parameters())


def test_a_whole_save_can_take_its_backbones_from_another_whole_save(backbone_dirs, tmp_path):
    """`backbones_from`: the backbones' files copied from a model saved whole, beside the trained tensors: it loads
    as the model; refused with a trained-only save, or from a directory without `vision/` and `lm/`, before any
    write."""
    model, processor = _trained_model(*backbone_dirs)
    model.save_pretrained(str(tmp_path / "whole"), processor=processor)
    model.save_pretrained(str(tmp_path / "copied"), processor=processor, backbones_from=tmp_path / "whole")
    for part in ("vision", "lm"):
        for name in os.listdir(tmp_path / "whole" / part):
            assert (tmp_path / "copied" / part / name).read_bytes() == (tmp_path / "whole" / part / name).read_bytes()
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    loaded, _ = load_pretrained(str(tmp_path / "copied"))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert loaded.config == model.config

    with pytest.raises(ValueError, match="backbones_from copies backbones into a full save"):
        model.save_pretrained(str(tmp_path / "x"), trained_only=True, backbones_from=tmp_path / "whole")
    model.save_pretrained(str(tmp_path / "small"), trained_only=True)
    with pytest.raises(ValueError, match=r"backbones_from '.*small' holds no vision/ or lm/: give a model saved whole"):
        model.save_pretrained(str(tmp_path / "x"), backbones_from=str(tmp_path / "small"))
    assert not os.path.exists(tmp_path / "x")


def test_trained_only_needs_backbone_names(make_model, tmp_path):
    model, _ = make_model("llama")  # in-memory backbones: nothing to refer to
    with pytest.raises(ValueError, match="names/paths"):
        model.save_pretrained(str(tmp_path / "x"), trained_only=True)
    model.save_pretrained(str(tmp_path / "full"))  # the full checkpoint works
    assert isinstance(Flamingo.from_pretrained(str(tmp_path / "full")), Flamingo)


def test_save_is_atomic_on_failure(backbone_dirs, tmp_path):
    model, processor = _trained_model(*backbone_dirs)
    target = tmp_path / "ckpt"
    model.save_pretrained(str(target), trained_only=True)
    before = sorted(os.listdir(target))

    class Broken:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError):
        model.save_pretrained(str(target), trained_only=True, processor=Broken())
    assert sorted(os.listdir(target)) == before  # the old checkpoint is intact
    assert [p for p in os.listdir(tmp_path) if p.startswith("ckpt.")] == []


def test_save_refuses_a_file_or_a_directory_holding_other_files(make_model, tmp_path):
    """Saving replaces the target directory whole: a file, or a directory of other files (say the working
    directory), was silently deleted. An earlier checkpoint is still replaced."""
    model, processor = make_model("llama")
    note = tmp_path / "notes.txt"
    note.write_text("keep me")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(str(note))
    with pytest.raises(ValueError, match="not a saved Flamingo model"):
        model.save_pretrained(str(tmp_path))
    assert note.read_text() == "keep me"
    target = tmp_path / "ckpt"
    model.save_pretrained(str(target), processor=processor)
    model.save_pretrained(str(target), processor=processor)  # over an earlier checkpoint: fine
    assert isinstance(Flamingo.from_pretrained(str(target)), Flamingo)


def test_a_damaged_checkpoint_is_named_when_loaded(make_model, tmp_path):
    """A truncated weights file (safetensors' own error named no file), a weight the model does not have (a renamed
    key would load as its untrained default) or a config without its media token id (the load worked, the first call
    failed with an AttributeError) is a clear error at load time."""
    import json

    from safetensors.torch import load_file, save_file

    model, processor = make_model("llama")
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    weights = tmp_path / "m" / "flamingo.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="flamingo.safetensors' is not a readable safetensors file"):
        Flamingo.from_pretrained(str(tmp_path / "m"))
    weights.write_bytes(whole)
    save_file({**load_file(weights), "xattn.0.attn.extra_gate": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"has unknown weights: \['xattn.0.attn.extra_gate'\]"):
        Flamingo.from_pretrained(str(tmp_path / "m"))
    weights.write_bytes(whole)
    config_path = tmp_path / "m" / "flamingo_config.json"
    config = json.loads(config_path.read_text())
    del config["media_token_id"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names no media_token_id"):
        Flamingo.from_pretrained(str(tmp_path / "m"))
    text = json.dumps(config)
    config_path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="flamingo_config.json' is not readable JSON"):
        Flamingo.from_pretrained(str(tmp_path / "m"))
    config_path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        Flamingo.from_pretrained(str(tmp_path / "m"))


def test_dual_encoder_gives_its_vision_half(tmp_path):
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    tower = load_vision_tower(str(tmp_path / "clip"))
    pixels = torch.randn(1, 3, 32, 32)
    full = CLIPModel.from_pretrained(tmp_path / "clip")
    assert torch.equal(
        tower(pixel_values=pixels).last_hidden_state, full.vision_model(pixel_values=pixels).last_hidden_state
    )


def test_every_atomic_write_refuses_a_directory_of_other_files(tmp_path):
    """The guard sits in `atomic_directory`, so exports and training checkpoints keep a user's files too."""
    from flamingo.runtime.checkpoint_io import atomic_directory

    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a training checkpoint \\(no state.json\\)"):
        with atomic_directory(str(tmp_path), "state.json", "a training checkpoint"):
            pass
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    for _ in range(2):  # new, then over its earlier write
        with atomic_directory(str(tmp_path / "ckpt"), "state.json", "a training checkpoint") as tmp:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                f.write("{}")
    assert os.listdir(tmp_path / "ckpt") == ["state.json"]
