"""The final model of a run whose frozen backbones are quantized and whose final save is whole (`model.init_from` a
model saved whole that names no backbone to reload: a converted OpenFlamingo 2.x or Otter, a model pulled from the
Hub): quantized weights are never written, so the save copies the float `vision/` and `lm/` of the directory the run
started from, which training never changes. Loaded as saved it is quantized again (the trained model's logits);
loaded with `quantize_frozen="none"` it is the float model with the trained tensors."""

from __future__ import annotations

import filecmp
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flamingo import load_pretrained
from flamingo.config import CONFIG_NAME, WEIGHTS_NAME
from flamingo.model import lora
from flamingo.model.card import CARD_NAME, model_card
from flamingo.model.quantize import quantize_frozen, quantized_mode
from flamingo.runtime.checkpoint_io import atomic_directory
from flamingo.tiny import random_image, tiny_flamingo
from flamingo.train.config import load_config
from flamingo.train.trainer import Trainer, check_final_save

from helpers import chat_run_config

pytest.importorskip("torchao")

QLORA = ["train.progress=false", "model.flamingo={quantize_frozen: int8, lm_lora: {r: 4, alpha: 8}}"]
PROMPT = "<image>What colour is it?"


@pytest.fixture(scope="module")
def unnamed_whole(tmp_path_factory) -> str:
    """A model saved whole whose config names no backbone (built from modules, as a conversion of a table-cut
    OpenFlamingo or an Otter checkpoint is)."""
    model, processor = tiny_flamingo("llama")
    assert model.config.vision_name_or_path is None and model.config.lm_name_or_path is None
    directory = str(tmp_path_factory.mktemp("unnamed") / "whole")
    model.save_pretrained(directory, processor=processor)
    return directory


def _logits(model, processor) -> torch.Tensor:
    batch = processor(PROMPT, images=[random_image(7)])
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_a_quantized_run_from_a_model_without_backbone_names_saves_whole(unnamed_whole, tmp_path):
    trainer = Trainer(load_config(str(chat_run_config(tmp_path, unnamed_whole, steps=2)), QLORA))
    assert quantized_mode(trainer.model) == "int8"
    final = trainer.run()
    for part in ("vision", "lm"):  # the float backbones the run started from, file for file
        compared = filecmp.dircmp(os.path.join(unnamed_whole, part), os.path.join(final, part))
        assert compared.left_list == compared.right_list and not compared.diff_files and not compared.funny_files
    trained = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}

    # loaded without quantizing: the float backbones with every trained tensor
    expected, processor = load_pretrained(unnamed_whole, quantize_frozen="none")
    lora.apply_lora(expected.lm, trainer.model.config.lm_lora)
    params = dict(expected.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value)
    floats, _ = load_pretrained(final, quantize_frozen="none")
    assert quantized_mode(floats) == "none"
    assert torch.equal(_logits(floats, processor), _logits(expected, processor))
    untrained, _ = load_pretrained(unnamed_whole)
    assert not torch.allclose(_logits(floats, processor), _logits(untrained, processor), atol=1e-4)  # it trained

    # loaded as saved: quantized again, as the run trained it
    again, _ = load_pretrained(final)
    assert again.config.quantize_frozen == "int8" and quantized_mode(again) == "int8"
    assert torch.allclose(_logits(again, processor), _logits(trainer.model, processor), atol=1e-5)
    assert not torch.allclose(_logits(again, processor), _logits(floats, processor), atol=1e-5)  # (int8 differs)


def test_backbones_changed_while_the_run_trained_are_not_taken(unnamed_whole, tmp_path):
    source = str(tmp_path / "source")
    shutil.copytree(unnamed_whole, source)
    trainer = Trainer(load_config(str(chat_run_config(tmp_path, source, steps=1)), QLORA))
    weights = os.path.join(source, "lm", "model.safetensors")
    os.utime(weights, ns=(0, os.stat(weights).st_mtime_ns + 10**9))  # rewritten since it loaded
    with pytest.raises(ValueError, match=r"the backbones in .*source \(vision/, lm/\) changed while the run trained"):
        trainer.run()
    assert not os.path.exists(os.path.join(trainer.config.train.output_dir, "final"))
    assert os.listdir(os.path.join(trainer.config.train.output_dir, "checkpoints"))  # the trained weights kept


def test_a_quantized_model_with_no_float_backbones_to_copy_is_refused_with_the_ways_out():
    """A model converted in memory (init_from an Otter or IDEFICS repository) or built by hand: no directory holds its
    float backbones, so its whole final save stays refused before step 1, naming what to do."""
    model, _ = tiny_flamingo("llama")
    model.config.quantize_frozen = "int8"
    quantize_frozen(model)
    with pytest.raises(
        ValueError,
        match=r"quantize_frozen=int8: quantized backbones are never saved whole .* \(it "
        r"names no backbone to load by name\).*init_from a model saved whole .*"
        r"`flamingo convert`.*train without quantize_frozen",
    ):
        check_final_save(model, None)
    check_final_save(model, None, backbones_from="/the/whole/model")  # with a source to copy them from


def _save_with_backbones_from_as_before(model, directory, source, processor):
    """The trainer's former way to write such a save: the config's backbone references pointed at `source` for a
    trained-only save (then restored), `source`'s backbones copied beside it, the model's own config and card written
    over."""
    c = model.config
    references = {
        k: getattr(c, k) for k in ("vision_name_or_path", "lm_name_or_path", "vision_revision", "lm_revision")
    }
    with atomic_directory(directory, CONFIG_NAME, "a saved Flamingo model") as tmp:
        trained = os.path.join(tmp, "trained")
        try:
            c.vision_name_or_path, c.lm_name_or_path = (os.path.join(source, part) for part in ("vision", "lm"))
            c.vision_revision = c.lm_revision = None
            model.save_pretrained(trained, trained_only=True, processor=processor)
            weights = os.path.join(trained, WEIGHTS_NAME)  # without the backbone-dtype record: its backbones are copied
            save_file(load_file(weights), weights, metadata={"format": "pt"})
        finally:
            for key, value in references.items():
                setattr(c, key, value)
        for name in os.listdir(trained):
            os.replace(os.path.join(trained, name), os.path.join(tmp, name))
        os.rmdir(trained)
        for part in ("vision", "lm"):
            shutil.copytree(os.path.join(source, part), os.path.join(tmp, part))
        c.save(tmp)
        with open(os.path.join(tmp, CARD_NAME), "w", encoding="utf-8") as f:
            f.write(model_card(tmp, os.path.basename(os.path.abspath(directory))))


def _files(directory):
    """Every file under `directory` -> its bytes, by relative path."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


class _Watched:
    """A processor whose save records the model's backbone references at that moment (a save that points them
    elsewhere meanwhile shows here)."""

    def __init__(self, processor, config):
        self.processor, self.config, self.seen = processor, config, []

    def save_pretrained(self, directory):
        keys = ("vision_name_or_path", "lm_name_or_path", "vision_revision", "lm_revision")
        self.seen.append({k: getattr(self.config, k) for k in keys})
        self.processor.save_pretrained(directory)


@pytest.mark.parametrize("named", [False, True])
def test_backbones_from_writes_the_former_bytes_and_leaves_the_config_alone(unnamed_whole, tmp_path, named):
    """`save_pretrained(..., backbones_from=)` writes, file for file and byte for byte, what the trainer's former
    save did (config pointed at the source, then restored), and the model's config never changes meanwhile."""
    model, processor = load_pretrained(unnamed_whole, quantize_frozen="none")
    spec = {"r": 4, "alpha": 8}
    lora.apply_lora(model.lm, spec)
    model.config.lm_lora, model.config.quantize_frozen = spec, "int8"
    if named:  # a model whose own references the save keeps (the source's are only where its backbones come from)
        model.config.vision_name_or_path, model.config.vision_revision = "org/vision", "0" * 40
        model.config.lm_name_or_path, model.config.lm_revision = "org/lm", "1" * 40
    quantize_frozen(model)
    with torch.no_grad():  # as if trained
        for p in model.trainable_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    before = model.config.to_dict()
    _save_with_backbones_from_as_before(model, str(tmp_path / "before" / "final"), unnamed_whole, processor)
    watched = _Watched(processor, model.config)
    model.save_pretrained(str(tmp_path / "now" / "final"), processor=watched, backbones_from=unnamed_whole)
    old, new = _files(tmp_path / "before" / "final"), _files(tmp_path / "now" / "final")
    assert sorted(new) == sorted(old) and all(new[name] == old[name] for name in old)
    assert {"vision/model.safetensors", "lm/model.safetensors", "flamingo.safetensors", CONFIG_NAME} <= set(new)
    assert watched.seen == [{k: before[k] for k in watched.seen[0]}] and model.config.to_dict() == before
