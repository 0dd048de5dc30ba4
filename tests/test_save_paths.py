"""Where a save may write: an empty path (`save_pretrained("")`, `--out ""`) names no directory and is refused, the
working directory left as it was; a trained-only save never replaces the directory holding the backbones it refers
to; the model card is written in UTF-8 whatever the platform's encoding, so a directory named in any script saves
and pushes."""

from __future__ import annotations

import builtins
import json
import os

import pytest
import torch

import flamingo.config
import flamingo.model.card
import flamingo.model.flamingo
import flamingo.processing
from flamingo import load_pretrained
from flamingo.cli import main
from flamingo.model.card import generated_for
from flamingo.runtime.checkpoint_io import atomic_directory, atomic_file, check_replaceable
from flamingo.tiny import tiny_flamingo


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory holding someone's files."""
    work = tmp_path / "project"
    (work / "src").mkdir(parents=True)
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_path_is_refused_and_the_working_directory_kept(project, path):
    model, processor = tiny_flamingo()
    with pytest.raises(ValueError, match="a saved Flamingo model: an empty path .* names nothing"):
        model.save_pretrained(path, processor=processor)
    with pytest.raises(ValueError, match="an empty path"):
        check_replaceable(path, "marker", "a directory")
    with pytest.raises(ValueError, match="an empty path"), atomic_directory(path, "marker", "a directory"):
        pass
    with pytest.raises(ValueError, match="an empty path"), atomic_file(path):
        pass
    assert sorted(os.listdir(project)) == ["notes.txt", "src"]
    assert sorted(os.listdir(project.parent)) == ["project"]  # no `.tmp-`/`.old-` sibling either


def test_the_command_line_refuses_an_empty_out(project, capsys):
    for argv in (
        ["convert", "open-flamingo", "--checkpoint", "checkpoint.pt", "--vision", "v", "--lm", "l"],
        ["convert", "idefics", "--model", "org/idefics"],
        ["export", "open-flamingo", "--model", "org/m"],
        ["export", "idefics", "--model", "org/m"],
    ):
        assert main([*argv, "--out", ""]) == 2, argv
        assert "an empty path ('') names nothing" in capsys.readouterr().err
    assert sorted(os.listdir(project)) == ["notes.txt", "src"]


def test_a_trained_only_save_over_the_directory_of_its_backbones_is_refused(tmp_path):
    model, processor = tiny_flamingo()
    full = tmp_path / "full"
    model.save_pretrained(str(full), processor=processor)
    loaded, processor = load_pretrained(str(full))
    loaded.config.vision_name_or_path, loaded.config.lm_name_or_path = str(full / "vision"), str(full / "lm")
    for target in (full, tmp_path):
        with pytest.raises(
            ValueError, match=f"a trained-only checkpoint .* would be written over or around '{full / 'vision'}'"
        ):
            loaded.save_pretrained(str(target), trained_only=True, processor=processor)
    assert {"vision", "lm"} <= set(os.listdir(full))
    load_pretrained(str(full))  # still whole
    loaded.save_pretrained(str(tmp_path / "elsewhere"), trained_only=True, processor=processor)
    load_pretrained(str(tmp_path / "elsewhere"))


def test_the_card_is_utf8_whatever_the_platforms_encoding(tmp_path, monkeypatch):
    """Windows' default text encoding (cp1252) for every `open` without one; paths stay Unicode, as there."""

    def cp1252_open(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):
        if "b" not in mode and encoding is None:
            encoding = "cp1252"
        return builtins.open(file, mode, buffering, encoding, *args, **kwargs)

    for module in (flamingo.model.flamingo, flamingo.model.card, flamingo.config, flamingo.processing):
        monkeypatch.setattr(module, "open", cp1252_open, raising=False)
    model, processor = tiny_flamingo()
    for name in ("模型-v1", "modèle-v1"):
        model.save_pretrained(str(tmp_path / name), processor=processor)
        text = (tmp_path / name / "README.md").read_text(encoding="utf-8")  # as a push reads it
        assert f"# {name}" in text
        assert generated_for(str(tmp_path / name), text) == name


def test_saving_again_over_a_checkpoint_refuses_files_no_save_writes(tmp_path):
    model, processor = tiny_flamingo()
    target = tmp_path / "model"
    model.save_pretrained(str(target), processor=processor)
    (target / "my_notes.txt").write_text("eval results")
    (target / "results").mkdir()
    before = sorted(os.listdir(target))
    for kwargs in ({}, {"processor": processor}):
        with pytest.raises(ValueError, match="holds my_notes.txt, results, which no save writes"):
            model.save_pretrained(str(target), **kwargs)
    assert sorted(os.listdir(target)) == before
    assert (target / "my_notes.txt").read_text() == "eval results"


def test_a_processor_saved_beside_the_model_is_kept_by_the_next_save(tmp_path):
    """The transformers habit: `model.save_pretrained(d); processor.save_pretrained(d)`, then the model saved again
    (after more training) without `processor=`: the processor's files stay, and the directory loads."""
    model, processor = tiny_flamingo()
    target = str(tmp_path / "model")
    model.save_pretrained(target)
    processor.save_pretrained(target)
    files = sorted(os.listdir(target))
    model.save_pretrained(target)
    assert sorted(os.listdir(target)) == files
    loaded, loaded_processor = load_pretrained(target)
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    model.save_pretrained(target, processor=processor)  # written anew with the model
    assert sorted(os.listdir(target)) == files
    with open(os.path.join(target, "flamingo_config.json")) as f:  # saved before these fields existed
        older = {k: v for k, v in json.load(f).items() if k not in ("num_image_references", "first_reference_token_id")}
    with open(os.path.join(target, "flamingo_config.json"), "w") as f:
        json.dump(older, f)
    model.save_pretrained(target)  # their defaults: still this model's processor
    assert sorted(os.listdir(target)) == files
    other, other_processor = tiny_flamingo(num_image_references=2)  # other added tokens: not its processor
    with pytest.raises(ValueError, match="holds the processor of another model .*pass processor="):
        other.save_pretrained(target)
    assert sorted(os.listdir(target)) == files
    other.save_pretrained(target, processor=other_processor)
    assert load_pretrained(target)[1].tokenizer.convert_tokens_to_ids("<image0>") == \
        other.config.first_reference_token_id


def test_a_card_edited_by_hand_is_kept_by_the_next_save(tmp_path, caplog):
    """A model saved, its README.md edited, the model saved again after more training: the edit stays (as a push
    keeps it). A card as generated is written anew, also when the directory was renamed since."""
    model, processor = tiny_flamingo()
    target = tmp_path / "model"
    model.save_pretrained(str(target), processor=processor)
    generated = (target / "README.md").read_text(encoding="utf-8")
    renamed = tmp_path / "renamed"
    os.rename(target, renamed)
    assert generated_for(str(renamed), generated) == "model"  # generated, for the old name
    with torch.no_grad():
        model.xattn[0].attn_gate.fill_(0.25)  # trained more: another card would not differ, but the save does
    model.save_pretrained(str(renamed), processor=processor)
    assert generated_for(str(renamed), (renamed / "README.md").read_text(encoding="utf-8")) == "renamed"
    edited = "# My model\n\nTrained on our photos; café ☕.\n"
    (renamed / "README.md").write_text(edited, encoding="utf-8")
    assert "keeping the README.md" not in caplog.text
    model.save_pretrained(str(renamed), processor=processor)
    assert (renamed / "README.md").read_text(encoding="utf-8") == edited
    assert "keeping the README.md" in caplog.text and "delete it to have the card written anew" in caplog.text
    (renamed / "README.md").unlink()  # deleted: written anew
    model.save_pretrained(str(renamed))
    assert generated_for(str(renamed), (renamed / "README.md").read_text(encoding="utf-8")) == "renamed"
