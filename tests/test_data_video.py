"""decode_video: frames sampled by timestamp at `fps`, uniform cap at max_frames, clear errors for bad files."""

import numpy as np
import pytest

from flamingo.data.fixtures import frame_level, tiny_processor, video_bytes
from flamingo.video import decode_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    path.write_bytes(video_bytes(6, rate=4))  # 6 s at 4 fps; second t is grey frame_level(t)
    return path


def _levels(frames):
    return [int(round(np.asarray(f, dtype=np.float32).mean())) for f in frames]


def _close(got, want):
    return len(got) == len(want) and all(abs(g - w) <= 4 for g, w in zip(got, want))  # lossy codec


def test_one_frame_per_second_in_order(clip):
    frames = decode_video(str(clip), fps=1.0, max_frames=10)
    assert _close(_levels(frames), [frame_level(t) for t in range(6)])
    assert frames[0].mode == "RGB" and frames[0].size == (16, 16)


def test_max_frames_caps_uniformly_and_other_fps_sample_by_timestamp(clip):
    capped = decode_video(str(clip), fps=1.0, max_frames=3)  # 6 sampled -> indices 1, 3, 5
    assert _close(_levels(capped), [frame_level(t) for t in (1, 3, 5)])
    half = decode_video(str(clip), fps=0.5, max_frames=10)  # t = 0, 2, 4
    assert _close(_levels(half), [frame_level(t) for t in (0, 2, 4)])
    dense = decode_video(clip.read_bytes(), fps=2.0, max_frames=100)  # from bytes; t = 0, 0.5, ..., 5.5
    assert _close(_levels(dense), [frame_level(k // 2) for k in range(12)])


def test_bad_files_raise_value_error_naming_them(tmp_path, clip):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[:300])
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"definitely not a video" * 10)
    for path in (cut, junk, tmp_path / "missing.mp4"):
        with pytest.raises(ValueError, match=path.name):
            decode_video(str(path))
    with pytest.raises(ValueError, match="cannot decode video .*junk.mp4"):  # PyAV's own ValueError, worded by us
        decode_video(str(junk))


def test_processor_loads_video_files_through_decode_video(clip):
    processor = tiny_processor(max_frames=4)
    pixels = processor.preprocess_media(str(clip))
    assert pixels.shape == (4, 3, 32, 32)  # 6 frames at 1 FPS, uniformly capped at the processor's 4
