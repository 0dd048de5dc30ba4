"""What the processor and the backbone loaders refuse, with errors that name the cause: a damaged or foreign
flamingo_processor.json, settings no model runs with, a list prompt on a declared-image processor, a vision tower
directory without its image processor, and a model that is no vision tower."""

from __future__ import annotations

import inspect
import json

import pytest

from flamingo.data.fixtures import tiny_processor
from flamingo.model.backbones import load_vision_tower
from flamingo.processing import PROCESSOR_SETTINGS, FlamingoProcessor, add_flamingo_tokens, load_image_processor
from flamingo.tiny import random_image, tiny_image_processor, tiny_lm, tiny_tokenizer, tiny_vision


def test_the_saved_settings_are_the_constructors_keywords():
    keywords = [p.name for p in inspect.signature(FlamingoProcessor.__init__).parameters.values()
                if p.kind is p.KEYWORD_ONLY]
    assert sorted(keywords) == sorted(PROCESSOR_SETTINGS)


def test_a_damaged_or_foreign_settings_file_is_refused_naming_it(tmp_path):
    tiny_processor().save_pretrained(str(tmp_path))
    path = tmp_path / "flamingo_processor.json"
    saved = json.loads(path.read_text())
    assert FlamingoProcessor.from_pretrained(str(tmp_path)).max_frames == saved["max_frames"]
    cases = {json.dumps({**saved, "chat_template_kwargs": {}}): r"unknown processor settings \['chat_template_kwargs'\]"
                                                                r".*known: \['max_length'",
             json.dumps(saved)[:20]: "is not readable JSON",
             "[]": "holds a JSON list, not an object",
             json.dumps({**saved, "video_fps": float("nan")}): "video_fps must be a finite number > 0, got nan",
             json.dumps({**saved, "max_frames": 0}): "max_frames must be an integer >= 1, got 0",
             json.dumps({**saved, "max_length": 0}): "max_length must be an integer >= 1",
             json.dumps({**saved, "image_references": "yes"}): "image_references must be true or false",
             json.dumps({**saved, "padding_side": "x"}): "padding_side must be 'left' or 'right', got 'x'",
             json.dumps({**saved, "template": "llava"}): r"template must be one of \('flamingo'"}
    for content, message in cases.items():
        path.write_text(content)
        with pytest.raises(ValueError, match=message) as info:
            FlamingoProcessor.from_pretrained(str(tmp_path))
        assert str(path) in str(info.value)


def test_settings_no_model_runs_with_are_refused_when_made_and_when_saved(tmp_path):
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    for bad, message in (({"max_frames": 0}, "max_frames"), ({"max_frames": 2.0}, "max_frames"),
                         ({"max_length": 0}, "max_length"), ({"max_length": -5}, "max_length"),
                         ({"video_fps": float("nan")}, "video_fps"), ({"video_fps": float("inf")}, "video_fps"),
                         ({"video_fps": 0.0}, "video_fps"), ({"video_fps": -1}, "video_fps")):
        with pytest.raises(ValueError, match=message):
            FlamingoProcessor(tok, tiny_image_processor(), **bad)
    processor = FlamingoProcessor(tok, tiny_image_processor(), max_length=None, video_fps=2)  # an int rate is fine
    processor.video_fps = float("nan")  # set after it was made: not written as NaN
    with pytest.raises(ValueError, match="video_fps must be a finite number > 0"):
        processor.save_pretrained(str(tmp_path / "p"))
    assert not (tmp_path / "p" / "flamingo_processor.json").exists()
    for blank in ("", " "):  # names no directory (not the working directory)
        with pytest.raises(ValueError, match="an empty path"):
            tiny_processor().save_pretrained(blank)


def test_a_null_max_length_is_the_tokenizers_limit_as_its_message_says(tmp_path):
    """`max_length: null` (None) is the tokenizer's `model_max_length`, no limit when it sets none (HF's huge
    default), in a processor made here and in a saved settings file; the message for a bad value says so."""
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    tok.model_max_length = 16
    processor = FlamingoProcessor(tok, tiny_image_processor(), max_length=None)
    assert processor.max_length == 16
    processor.save_pretrained(str(tmp_path))
    path = tmp_path / "flamingo_processor.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_length": None}))
    assert FlamingoProcessor.from_pretrained(str(tmp_path)).max_length == 16
    with pytest.raises(ValueError, match="longer than max_length=16"):
        FlamingoProcessor.from_pretrained(str(tmp_path))("word " * 40)
    tok.model_max_length = int(1e30)  # HF's "no limit"
    unlimited = FlamingoProcessor(tok, tiny_image_processor(), max_length=None)
    assert unlimited.max_length is None and len(unlimited("word " * 40)["input_ids"][0]) > 16
    with pytest.raises(ValueError, match=r"max_length must be an integer >= 1 \(or null: the tokenizer's "
                                         r"model_max_length, no limit if it sets none\), got 0"):
        FlamingoProcessor(tok, tiny_image_processor(), max_length=0)


def test_a_list_prompt_on_a_declared_image_processor_says_what_to_do():
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok, num_references=2)
    processor = FlamingoProcessor(tok, tiny_image_processor(), image_references=True)
    prompt = ["Question:", random_image(0), "Answer:"]
    with pytest.raises(ValueError, match="interleaved-list prompt .* cannot declare .*image_references=False"):
        processor(prompt)
    batch = processor(prompt, image_references=False)  # as the message says
    assert batch["num_media"].tolist() == [1]
    assert processor([["Question: what is it?", " Answer:"]])["num_media"].tolist() == [0]  # text alone: fine


def test_a_tower_directory_without_its_image_processor_is_named(tmp_path):
    tiny_vision().save_pretrained(str(tmp_path / "tower"))
    with pytest.raises(ValueError, match=r"no preprocessor_config.json in .*tower.*save_pretrained"):
        load_image_processor(str(tmp_path / "tower"))
    tiny_image_processor().save_pretrained(str(tmp_path / "tower"))
    assert load_image_processor(str(tmp_path / "tower")) is not None


def test_a_model_that_is_no_vision_tower_is_refused(tmp_path):
    lm = tiny_lm()
    lm.save_pretrained(str(tmp_path / "lm"))
    with pytest.raises(ValueError, match=r"loaded from .*lm.* is a \w+ \(model_type 'llama'\), not a vision tower"):
        load_vision_tower(str(tmp_path / "lm"))
    with pytest.raises(ValueError, match="not a vision tower: its forward reads input_ids"):
        load_vision_tower(lm.model)
    assert load_vision_tower(tiny_vision()) is not None
