"""A saved model whose backbone config or tokenizer files are damaged is refused when it loads with a one-line
ValueError naming the backbone or the directory and the file, not a library's traceback naming neither."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil

import pytest

from flamingo import load_pretrained
from flamingo.processing import FlamingoProcessor
from flamingo.tiny import tiny_flamingo

typed_configs = pytest.mark.skipif(
    importlib.util.find_spec("huggingface_hub.errors") is None
    or not hasattr(importlib.import_module("huggingface_hub.errors"), "StrictDataclassError"),
    reason="an older huggingface_hub (transformers 4): configs do not check their fields' types",
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved whole (its `lm/` and `vision/` too) with its processor."""
    directory = tmp_path_factory.mktemp("saved") / "m"
    model, processor = tiny_flamingo("llama", "clip")
    model.save_pretrained(str(directory), processor=processor)
    return directory


def _edited(saved, tmp_path, file: str, edit) -> str:
    """A copy of the saved model with `file` (relative to it) edited by `edit(text) -> text`."""
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    path = copy / file
    path.write_text(edit(path.read_text()))
    return str(copy)


def _retyped(field: str, value):
    def edit(text: str) -> str:
        config = json.loads(text)
        assert field in config
        return json.dumps({**config, field: value})

    return edit


@typed_configs
@pytest.mark.parametrize(
    "part,field,value,what",
    [("lm", "hidden_size", "64", "the LM's config"), ("vision", "num_channels", "3", "the vision tower's config")],
)
def test_a_backbone_config_field_of_the_wrong_type_names_the_backbone_and_file(
    saved, tmp_path, part, field, value, what
):
    copy = _edited(saved, tmp_path, f"{part}/config.json", _retyped(field, value))
    with pytest.raises(ValueError) as caught:
        load_pretrained(copy)
    message = str(caught.value)
    assert message.startswith(f"{what} '{copy}/{part}/config.json' is invalid") and field in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "file,edit,why",
    [
        ("tokenizer.json", lambda text: text[: len(text) // 2], "JSONDecodeError"),
        ("tokenizer.json", lambda text: json.dumps({"model": 3}), "KeyError"),
        ("tokenizer_config.json", lambda text: "[1, 2]", "AttributeError"),
    ],
)
def test_a_damaged_tokenizer_file_names_the_directory(saved, tmp_path, file, edit, why):
    copy = _edited(saved, tmp_path, file, edit)
    with pytest.raises(ValueError, match=f"cannot read the tokenizer in '{copy}' .*: {why}"):
        FlamingoProcessor.from_pretrained(copy)
