"""An MPO (a JPEG holding a second image: a stereo pair's other half, a phone camera's gain map) is a still photo:
the processor, training data and the server read its first image only, never the second as a frame."""

import base64

import numpy as np
import pytest
from PIL import Image

from flamingo.data.fixtures import tiny_processor
from flamingo.data.sources import decode_frames, file_ref
from flamingo.processing import image_frames


@pytest.fixture
def mpo(tmp_path):
    """(path, the first image as PIL reads it): an MPO whose second image is larger and of another colour."""
    first, second = Image.new("RGB", (32, 24), (200, 30, 30)), Image.new("RGB", (64, 48), (30, 30, 200))
    path = tmp_path / "photo.jpg"
    first.save(path, "MPO", save_all=True, append_images=[second])
    with Image.open(path) as opened:
        assert opened.format == "MPO" and opened.n_frames == 2  # PIL reads it as two frames
        expected = np.asarray(opened.convert("RGB"))
    return path, expected


def _is_first(frames, expected):
    return len(frames) == 1 and np.array_equal(np.asarray(frames[0]), expected)


@pytest.mark.parametrize("fps", [1.0, 10.0, 30.0])  # at 10 FPS or more the second image was a frame
def test_an_mpo_reads_as_its_first_image(mpo, fps):
    path, expected = mpo
    with Image.open(path) as opened:
        opened.seek(1)  # a caller's image on its second image: the first is read, and the image left where it was
        assert _is_first(image_frames(opened, fps=fps), expected)
        assert opened.tell() == 1
    assert _is_first(tiny_processor().load_media(str(path)), expected)


def test_training_data_reads_an_mpo_as_its_first_image(mpo):
    path, expected = mpo
    assert _is_first(decode_frames(path.read_bytes(), str(path), fps=10.0), expected)
    assert _is_first(file_ref(str(path)).load(fps=10.0), expected)


def test_the_server_reads_an_mpo_as_its_first_image(mpo):
    pytest.importorskip("fastapi")  # the server's extra
    from flamingo.serve.media import MediaPolicy, load_medium

    path, expected = mpo
    url = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
    medium = load_medium(url, MediaPolicy(max_pixels=32 * 24), fps=10.0)  # the second image, unread, is over it
    assert isinstance(medium, Image.Image) and np.array_equal(np.asarray(medium), expected)
