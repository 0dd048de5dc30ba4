"""FlamingoProcessor: prompt conventions, padding, clear errors, persistence."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from flamingo import FlamingoProcessor
from flamingo.processing import add_flamingo_tokens
from flamingo.runtime.compat import TRANSFORMERS
from flamingo.tiny import random_image, tiny_image_processor, tiny_tokenizer
from flamingo.video import uniform_frame_indices

from helpers import save_sideways_jpeg


@pytest.fixture
def processor():
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    return FlamingoProcessor(tok, tiny_image_processor("clip"), max_length=64)


def test_interleaved_list_equals_string_with_placeholders(processor):
    img = random_image(0)
    a = processor(["Question: what?", img, "Answer: cat<|endofchunk|>"])
    b = processor("Question: what?<image>Answer: cat<|endofchunk|>", images=[img])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["images"], b["images"])
    assert a["images"].shape == (1, 1, 1, 3, 32, 32)
    ids = a["input_ids"][0].tolist()
    assert ids.count(processor.media_token_id) == 1 and ids.count(processor.end_of_chunk_token_id) == 1


def test_an_interleaved_prompt_holding_a_video_as_frames_is_one_prompt(processor):
    """A list of PIL frames inside an interleaved list is a video medium, not a second prompt (it was read as a batch
    of three prompts, the frames as four images)."""
    frames = [random_image(i) for i in range(4)]
    interleaved = processor(["Question:", frames, " what moves? Answer:"])
    string = processor("Question:<image> what moves? Answer:", images=[frames])
    assert torch.equal(interleaved["input_ids"], string["input_ids"])
    assert interleaved["num_media"].tolist() == [1] and interleaved["images"].shape[:3] == (1, 1, 4)
    assert torch.equal(interleaved["images"], string["images"])
    batch = processor([["Question:", frames, " what?"], ["A:", random_image(5)]])  # two interleaved prompts
    assert batch["input_ids"].shape[0] == 2 and batch["num_media"].tolist() == [1, 1]


def test_padding_sides_and_media_padding(processor):
    imgs = [[random_image(0), random_image(1)], []]
    left = processor(["<image>a<image>b", "plain text that is longer"], images=imgs, padding_side="left")
    right = processor(["<image>a<image>b", "plain text that is longer"], images=imgs, padding_side="right")
    assert left["attention_mask"][0, 0] == 0 and right["attention_mask"][0, -1] == 0
    assert left["num_media"].tolist() == [2, 0]
    assert left["images"].shape[:2] == (2, 2) and torch.equal(left["images"][1], torch.zeros_like(left["images"][1]))


def test_processor_rejects_placeholder_mismatch_bad_media_and_over_long_text(processor, tmp_path):
    with pytest.raises(ValueError, match="placeholder"):
        processor("<image><image>two", images=[random_image(0)])
    with pytest.raises(ValueError, match="placeholder"):
        processor("no placeholder", images=[random_image(0)])
    with pytest.raises(ValueError, match="unsupported media type"):
        processor("<image>x", images=[42])
    with pytest.raises(ValueError, match="longer than max_length"):
        processor("word " * 200)
    with pytest.raises(ValueError, match="not found"):
        processor("<image>x", images=[str(tmp_path / "missing.png")])
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot decode image"):
        processor("<image>x", images=[str(bad)])


def test_over_long_text_is_told_once_by_us_not_by_hf(caplog):
    """A tokenizer that knows its LM's context (model_max_length, as hub tokenizers and the demo's have it): a prompt
    past it is refused by our error, a training text is truncated, an eval query is measured and skipped; HF's own
    warning ("... will result in indexing errors") is logged by none of them."""
    from flamingo.data.sequence import tokenize

    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    tok.model_max_length = 16
    processor = FlamingoProcessor(tok, tiny_image_processor("clip"))
    assert processor.max_length == 16
    text = "word " * 40
    with pytest.raises(ValueError, match="longer than max_length=16"):
        processor(text)
    assert len(tokenize(processor, text, 16)) == 16
    assert len(processor.token_ids(text)) > 16
    assert "indexing errors" not in caplog.text
    tok(text)  # the check can fail: HF's plain call logs it
    assert "indexing errors" in caplog.text


def test_image_file_and_array_inputs_give_the_same_pixels(processor, tmp_path):
    img = random_image(3)
    path = tmp_path / "a.png"
    img.save(path)
    a = processor("<image>x", images=[str(path)])["images"]
    b = processor("<image>x", images=[np.asarray(img)])["images"]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="padding_side must be"):  # was right padding, silently
        processor(["<image>x", "y"], images=[[img], []], padding_side="middle")
    # a medium alone stands for its one-item list (a path was read one character at a time, a PIL image failed)
    for alone in (str(path), path, img):
        assert torch.equal(processor("<image>x", images=alone)["images"], a)
    batch = processor(["<image>x", "<image>y"], images=[img, [str(path)]])["images"]
    assert torch.equal(batch[0], a[0]) and torch.equal(batch[1], a[0])


def test_long_videos_are_subsampled_uniformly(processor):
    assert uniform_frame_indices(3, 8) == [0, 1, 2]
    assert uniform_frame_indices(16, 4) == [2, 6, 10, 14]
    frames = [random_image(i) for i in range(20)]
    processor.max_frames = 4
    assert processor("<image>v", images=[frames])["images"].shape[2] == 4


def test_saved_processor_loads_to_the_same_ids_and_pixels(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = FlamingoProcessor.from_pretrained(str(tmp_path))
    img = random_image(0)
    a, b = processor("<image>hello", images=[img]), loaded("<image>hello", images=[img])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["images"], b["images"])
    assert loaded.max_length == 64


def test_transparent_pixels_are_composited_onto_white_as_the_image_processor_does(processor):
    """An image with alpha (RGBA, LA) is composited onto white, whatever the transformers version: the pixels
    transformers 5.25 gives it (its `convert_to_rgb`; 4.54 kept the colour under transparent pixels, as a plain
    convert("RGB") does)."""
    rgba = np.asarray(random_image(4).convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1], dtype=np.uint8)[None, :]  # (H, W): transparent to opaque
    for image in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba, "RGBA").convert("LA")):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        composited = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        expected = processor.image_processor(images=[composited], return_tensors="pt")["pixel_values"]  # (1, C, H, W)
        assert torch.equal(processor("<image>x", images=[image])["images"][0, 0], expected), image.mode
        if TRANSFORMERS >= (5, 25):  # (seen there; 4.54 converts without compositing)
            direct = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            assert torch.equal(direct, expected), image.mode


def test_image_files_are_turned_upright_by_their_exif_orientation(processor, tmp_path):
    """A photo file stored sideways with an EXIF orientation reads as the image processor reads the file (upright)."""
    path = save_sideways_jpeg(tmp_path / "sideways.jpg")
    with Image.open(path) as stored:
        upright = ImageOps.exif_transpose(stored)
    assert upright.size == (20, 40)
    expected = processor.image_processor(images=[upright], return_tensors="pt")["pixel_values"]
    assert torch.equal(processor("<image>x", images=[str(path)])["images"][0, 0], expected)


def test_files_uploads_and_training_shards_read_an_image_alike(processor, tmp_path):
    """The processor's file path, the server's upload decoder and the training shards' decoder give the same pixels
    for a sideways JPEG and a half-transparent PNG (upright, on white), so a model sees an image in use as it saw it
    in training."""
    from flamingo.data.sources import decode_frames

    pytest.importorskip("fastapi")  # the server's extra (the oldest pair's environment runs without it)
    from flamingo.serve.media import MediaPolicy, _decode_image

    save_sideways_jpeg(tmp_path / "sideways.jpg")
    clear = Image.new("RGBA", (32, 32), (0, 200, 0, 255))
    clear.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half transparent black: white once composited
    clear.save(tmp_path / "clear.png")
    for name in ("sideways.jpg", "clear.png"):
        path = tmp_path / name
        expected = processor("<image>x", images=[str(path)])["images"][0, 0]
        for decoded in (decode_frames(path.read_bytes(), name)[0],
                        _decode_image(path.read_bytes(), MediaPolicy(max_pixels=10**8), name, 1.0, 8)):
            assert torch.equal(processor("<image>x", images=[decoded])["images"][0, 0], expected), name
    assert decode_frames((tmp_path / "sideways.jpg").read_bytes(), "s")[0].size == (20, 40)
    assert decode_frames((tmp_path / "clear.png").read_bytes(), "c")[0].getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("array", [np.full((32, 32, 3), 0.5), np.full((2, 32, 32, 3), 300),
                                   np.ones((32, 32, 3), dtype=bool)])
def test_arrays_other_than_uint8_are_refused_not_cast(processor, array):
    """A float image in [0, 1] cast to uint8 was black, int values past 255 wrapped around: refused by name."""
    with pytest.raises(ValueError, match="uint8"):
        processor("<image>x", images=[array])
