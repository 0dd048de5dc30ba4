"""The demo's hand-written prompts (flamingo_demo/tryit.py): fresh binding words, answer words, well-formed prompts."""

from __future__ import annotations

import pytest

from flamingo.references import resolve_declarations
from flamingo_demo.tryit import HAND_PROMPTS, HAND_WORDS, answer_word, fresh_hand_words
from flamingo_demo.world import KINDS


def test_hand_written_binding_words_are_fresh(tmp_path):
    text = tmp_path / "docs.jsonl"
    text.write_text('{"text": ["This is a Dax.", "a wugs is not a wug"]}\n')
    assert fresh_hand_words([str(text)]) == ["toma", "fep"]  # dax and wug occur (whole words, any case)
    assert fresh_hand_words([]) == list(HAND_WORDS[:2])
    text.write_text(" ".join(HAND_WORDS[1:]))
    with pytest.raises(ValueError, match="occurs in the training text"):
        fresh_hand_words([str(text)])
    # answers are read as the VQA task reads a generation: cut at a newline or a new question, normalised
    assert answer_word(" Ring.") == "ring" and answer_word("3\nQuestion:How many objects are there?") == "3"
    assert answer_word("yellow star") == "yellow star"  # not "yellow": a longer answer is wrong, as in the harness
    assert answer_word("") == ""


def test_each_prompt_has_one_image_per_scene_and_a_query_answer_no_demo_gives():
    for p in HAND_PROMPTS:
        text = p.text.format(a="dax", b="wug") if p.binding else p.text
        if p.image_references:  # declared images: the processor places them where declared
            text = resolve_declarations(text, len(p.scenes), len(p.scenes))
        assert text.count("<image>") == len(p.scenes), p.name
        assert text.rstrip().endswith(("Short answer:", "This is a")), p.name
        assert all(s.get("kind", "circle") in KINDS for s in p.scenes)
        if not p.binding:  # the query's answer is in none of the demos: copying a demo is wrong
            assert f"Short answer:{p.expected}<" not in text, p.name
    binding = next(p for p in HAND_PROMPTS if p.binding)
    # the query is the first kind again, and the last demo is another kind: the latest word is the wrong answer
    assert binding.scenes[-1]["kind"] == binding.scenes[0]["kind"] != binding.scenes[-2]["kind"]


def test_hand_prompts_are_answered_as_the_generate_command_answers_them(tmp_path, capsys):
    """The demo runs its prompts through the API (`generate_text`), not through the CLI; the text is what
    `flamingo generate` prints for the same model, prompt and images."""
    from flamingo import load_pretrained
    from flamingo.cli import main
    from flamingo.tiny import (
        random_image,
        tiny_flamingo,
    )
    from flamingo_demo.tryit import generate_text

    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    images = []
    for i in range(2):
        random_image(i).save(tmp_path / f"{i}.png")
        images.append(str(tmp_path / f"{i}.png"))
    prompt = "<image>Question: what? Short answer: red<|endofchunk|><image>Question: what? Short answer:"
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", prompt, "--image", images[0],
                 "--image", images[1], "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    loaded, loaded_processor = load_pretrained(str(tmp_path / "model"))
    assert generate_text(loaded, loaded_processor, prompt, images, max_new_tokens=6) == printed

    # declared images with a reference, as `flamingo generate --image-references` reads them
    model, processor = tiny_flamingo(num_image_references=4)
    model.save_pretrained(str(tmp_path / "refs"), processor=processor)
    prompt = "Image 0 is <image0>. Image 1 is <image1>. Question:What colour is the object in <image0>? Short answer:"
    assert main(["generate", "--model", str(tmp_path / "refs"), "--prompt", prompt, "--image", images[0],
                 "--image", images[1], "--max-new-tokens", "6", "--image-references"]) == 0
    printed = capsys.readouterr().out.strip()
    loaded, loaded_processor = load_pretrained(str(tmp_path / "refs"))
    assert generate_text(loaded, loaded_processor, prompt, images, max_new_tokens=6, image_references=True) == printed
