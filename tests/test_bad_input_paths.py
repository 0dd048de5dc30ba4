"""A media path that can name no readable file is one counted skip (`missing_file`), in every kind that names media
by path, in `data inspect`, the training loader and `data pack`: a path holding a NUL byte or half a UTF-16
surrogate pair (valid JSON, no file's name), and one naming a FIFO, which would block a read forever."""

from __future__ import annotations

import contextlib
import os
import signal
import tarfile

import pytest

from flamingo.data import build_source
from flamingo.data.fixtures import image_bytes, mmc4_document, tiny_processor, video_bytes, write_jsonl
from flamingo.data.inspect import inspect_dataset
from flamingo.data.pack import pack
from flamingo.train.config import DatasetSection

NUL = "img/0\0.png"
SURROGATE = "img/\ud83d.png"
FIFO = "img/fifo.png"
BAD_PATHS = [NUL, SURROGATE, FIFO]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture
def media(tmp_path):
    """`tmp_path/img/{0,1}.png`, `img/0.mp4` and the FIFOs `img/fifo.png`, `img/fifo.mp4`."""
    (tmp_path / "img").mkdir()
    for i in range(2):
        (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(i))
    (tmp_path / "img" / "0.mp4").write_bytes(video_bytes(1))
    os.mkfifo(tmp_path / "img" / "fifo.png")
    os.mkfifo(tmp_path / "img" / "fifo.mp4")
    return tmp_path


class Blocked(BaseException):
    """A read blocked: no `except Exception` (nor OSError, as TimeoutError is) on the way may take it for a skip."""


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    """Fail, rather than hang the suite, where a read blocks (a FIFO with no writer)."""

    def fail(*_):
        raise Blocked(f"blocked for {seconds} s")

    before = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def _as_video(path: str) -> str:
    return path.replace(".png", ".mp4")  # (pack takes videos by a container's extension)


def _rows(kind: str, path: str) -> list[dict]:
    """A good row and one naming `path` (for chat: both conversation forms) in `kind`'s layout."""
    if kind == "pairs":
        return [{"image": "img/1.png", "caption": "a good one"}, {"image": path, "caption": "a bad one"}]
    if kind == "pairs_images":
        caption = "Image 0 is <image0>. Image 1 is <image1>."
        return [
            {"images": ["img/0.png", "img/1.png"], "caption": caption},
            {"images": ["img/0.png", path], "caption": caption},
        ]
    if kind == "video":
        return [{"video": "img/0.mp4", "caption": "a good clip"}, {"video": _as_video(path), "caption": "a bad clip"}]
    if kind == "interleaved":
        return [mmc4_document(3, {0: 1}, image_names=["img/1.png"]), mmc4_document(3, {0: 1}, image_names=[path])]
    turns = [{"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A square."}]
    return [
        {"image": "img/1.png", "conversations": turns},
        {"image": path, "conversations": turns},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": path}},
                        {"type": "text", "text": "And this?"},
                    ],
                },
                {"role": "assistant", "content": "A square."},
            ]
        },
    ]


KINDS = ["pairs", "pairs_images", "video", "interleaved", "chat"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", BAD_PATHS, ids=["nul", "surrogate", "fifo"])
def test_inspect_counts_a_path_naming_no_readable_file_as_missing_file(media, processor, kind, bad):
    table = write_jsonl(str(media / "rows.jsonl"), _rows(kind, bad))
    with no_hang():
        report = inspect_dataset(table, kind.split("_")[0], processor if kind != "pairs_images" else None)
    bad_rows = report.records - 1
    assert report.samples == 1 and report.skipped == {"missing_file": bad_rows}
    why = report.first_skip["missing_file"]
    named = repr(_as_video(bad) if kind == "video" else bad)[1:-1]
    assert named in why and ("not a regular file" in why) == (bad == FIFO)
    report.table().encode()  # printable: the name is escaped, never a raw NUL or surrogate


def test_the_training_loader_skips_them_and_goes_on(media, processor):
    rows = [{"image": f"img/{i % 2}.png", "caption": f"photo {i}"} for i in range(4)]
    rows[1:1] = [{"image": bad, "caption": "bad"} for bad in BAD_PATHS]
    table = write_jsonl(str(media / "pairs.jsonl"), rows)
    src = build_source(
        DatasetSection("p", "pairs", table, 1, options={"shuffle": False, "drop_last": False}), processor
    )
    with no_hang():
        seen = sum(batch["input_ids"].shape[0] for batch in src)
    assert seen == 4 and src.skipped == {"missing_file": 3}


@pytest.mark.parametrize("kind", ["pairs", "video", "chat"])
def test_pack_counts_them_and_writes_the_good_rows(media, kind):
    rows = [row for bad in BAD_PATHS for row in _rows(kind, bad)[1:]]
    table = write_jsonl(str(media / "rows.jsonl"), _rows(kind, "img/1.png")[:1] + rows)
    with no_hang():
        result = pack(str(media / "out"), kind=kind, source=table)
    assert result["samples"] == 1 and result["skipped"] == {"missing_file": len(rows)}
    with tarfile.open(result["shards"][0]) as tar:
        assert len({name.split(".")[0] for name in tar.getnames()}) == 1


def test_pack_drops_such_an_image_from_a_document(media):
    docs = [mmc4_document(3, {0: 1, 1: 2}, image_names=["img/1.png", bad]) for bad in BAD_PATHS]
    table = write_jsonl(str(media / "docs.jsonl"), docs)
    with no_hang():
        result = pack(str(media / "out"), kind="interleaved", source=table)
    assert result["samples"] == 3 and result["dropped_images"] == 3 and result["skipped"] == {}


def test_the_eval_media_loader_refuses_them_without_reading(media, processor):
    """Eval's loader (`MediaLoader`, by `FlamingoProcessor.load_media`) asks `is_file` first: each is unreadable."""
    from flamingo.eval.predict import MediaLoader

    loader = MediaLoader(processor)
    with no_hang():
        assert [loader.try_load(str(media / bad)) for bad in BAD_PATHS] == [None] * 3
    assert all("media file not found" in why for why in loader.failed.values())
