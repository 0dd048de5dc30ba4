"""Small synthetic datasets in the training formats, offline and fast: for the tests and bench/data.py.

Media encode their identity: image `i` is a solid colour `colour(i)`; frame `t` (at second t) of a video is grey
level `frame_level(t)`, so tests can check which image went where and which frames were sampled.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from ..processing import FlamingoProcessor, add_flamingo_tokens
from ..tiny import tiny_image_processor, tiny_tokenizer


def colour(i: int) -> tuple[int, int, int]:
    return ((37 * i) % 256, (91 * i + 50) % 256, (53 * i + 100) % 256)


def frame_level(t: int) -> int:
    return min(255, 20 * t)


def image_bytes(i: int, size: int = 16, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour(i)).save(buf, format=fmt)
    return buf.getvalue()


def video_bytes(seconds: int, rate: int = 4, size: int = 16) -> bytes:
    """An mp4 (MPEG-4 part 2) of `seconds` s at `rate` fps; every frame of second t is grey `frame_level(t)`."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(seconds * rate):
            arr = np.full((size, size, 3), frame_level(k // rate), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


CORRUPT_IMAGE = b"\x89PNG\r\n\x1a\n this is not a png"


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_jsonl(path: str, rows: Sequence[Any]) -> str:
    """Rows: dicts (written as JSON) or raw strings (written verbatim: for malformed lines)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_tar(path: str, members: Sequence[tuple[str, bytes]]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_pairs(root: str, n: int, *, bad: bool = True, size: int = 16) -> dict[str, Any]:
    """`root/pairs.jsonl` + `root/images/`: n good pairs (caption `"photo {i}"`) and, when `bad`, one of each:
    corrupt image, missing file, empty caption, malformed JSON line. Returns {path, good: [keys], bad: {reason: n}}."""
    rows: list[Any] = []
    for i in range(n):
        _write(os.path.join(root, "images", f"{i}.png"), image_bytes(i, size))
        rows.append({"image": f"images/{i}.png", "caption": f"photo {i}"})
    good = [f"pairs.jsonl:{i + 1}" for i in range(n)]  # file:line
    counts: dict[str, int] = {}
    if bad:
        _write(os.path.join(root, "images", "corrupt.png"), CORRUPT_IMAGE)
        rows += [{"image": "images/corrupt.png", "caption": "corrupt"},
                 {"image": "images/missing.png", "caption": "missing"},
                 {"image": "images/0.png", "caption": "   "},
                 '{"image": "images/0.png", "caption": ']
        counts = {"bad_image": 1, "missing_file": 1, "empty_text": 1, "bad_json": 1}
    path = write_jsonl(os.path.join(root, "pairs.jsonl"), rows)
    return {"path": path, "good": good, "bad": counts}


def make_pair_shards(root: str, n: int, per_shard: int, *, video: bool = False, seconds: int = 2,
                     bad: bool = False) -> dict[str, Any]:
    """WebDataset shards `root/shard-000000.tar`, ...: `{key}.png|mp4` + `{key}.txt` (or `.json` every 3rd)."""
    members: list[tuple[str, bytes]] = []
    for i in range(n):
        key = f"s{i:05d}"
        members.append((f"{key}.mp4", video_bytes(seconds)) if video else (f"{key}.png", image_bytes(i)))
        if i % 3 == 2:
            members.append((f"{key}.json", json.dumps({"caption": f"sample {i}"}).encode()))
        else:
            members.append((f"{key}.txt", f"sample {i}".encode()))
    counts = {}
    if bad:
        members += [("zbad.png" if not video else "zbad.mp4", CORRUPT_IMAGE), ("zbad.txt", b"corrupt")]
        counts = {"bad_video" if video else "bad_image": 1}
    paths = []
    per = 2 * per_shard
    for k in range(0, len(members), per):
        paths.append(write_tar(os.path.join(root, f"shard-{k // per:06d}.tar"), members[k:k + per]))
    pattern = os.path.join(root, "shard-{%06d..%06d}.tar" % (0, len(paths) - 1))
    return {"path": pattern, "files": paths, "bad": counts}


def make_videos(root: str, n: int, *, seconds: int = 3, bad: bool = True) -> dict[str, Any]:
    """`root/videos.jsonl` + `root/videos/`: n clips (caption `"clip {i}"`) and, when `bad`, a truncated clip and a
    missing one."""
    rows: list[Any] = []
    data = video_bytes(seconds)
    for i in range(n):
        _write(os.path.join(root, "videos", f"{i}.mp4"), data)
        rows.append({"video": f"videos/{i}.mp4", "caption": f"clip {i}"})
    counts: dict[str, int] = {}
    if bad:
        _write(os.path.join(root, "videos", "cut.mp4"), data[: len(data) // 2])
        rows += [{"video": "videos/cut.mp4", "caption": "cut"}, {"video": "videos/none.mp4", "caption": "none"}]
        counts = {"bad_video": 1, "missing_file": 1}
    return {"path": write_jsonl(os.path.join(root, "videos.jsonl"), rows), "bad": counts}


def mmc4_document(n_sentences: int, matches: dict[int, int], n_images: Optional[int] = None, *,
                  image_names: Optional[Sequence[str]] = None, sim: float = 0.9, noise: float = 0.1,
                  inline: Optional[Sequence[bytes]] = None) -> dict[str, Any]:
    """A document whose image i matches sentence `matches[i]` with similarity `sim` (others get `noise`)."""
    n_images = n_images if n_images is not None else len(matches)
    matrix = [[noise] * n_sentences for _ in range(n_images)]
    for i, j in matches.items():
        matrix[i][j] = sim
    info = []
    for i in range(n_images):
        entry: dict[str, Any] = {"matched_text_index": matches.get(i, 0), "matched_sim": matrix[i][matches.get(i, 0)]}
        if inline is not None:
            entry["image_base64"] = base64.b64encode(inline[i]).decode()
        else:
            entry["image_name"] = image_names[i] if image_names else f"img{i}.png"
        info.append(entry)
    return {"text_list": [f"Sentence {j} is here." for j in range(n_sentences)], "image_info": info,
            "similarity_matrix": matrix}


def make_interleaved(root: str, n: int, *, bad: bool = True, images_per_doc: int = 2, sentences: int = 4,
                     tar_shards: int = 0) -> dict[str, Any]:
    """n documents (`root/docs.jsonl` + images, or `tar_shards` WebDataset shards with image members).

    Document d: `sentences` sentences, image k (colour 10*d + k) matched to sentence 2k+1 (or the last one).
    When `bad`: one document with no image above threshold, one with a missing image, one with an empty text, one
    malformed line (JSONL only).
    """
    docs, files = [], {}
    for d in range(n):
        names = [f"d{d}_{k}.png" for k in range(images_per_doc)]
        matches = {k: min(2 * k + 1, sentences - 1) for k in range(images_per_doc)}
        doc = mmc4_document(sentences, matches, image_names=names)
        doc["key"] = f"doc{d}"
        docs.append(doc)
        for k, name in enumerate(names):
            files[name] = image_bytes(10 * d + k)
    counts: dict[str, int] = {}
    raw_bad: list[str] = []
    if bad:
        low = mmc4_document(sentences, {0: 1}, image_names=["d0_0.png"], sim=0.1)
        missing = mmc4_document(sentences, {0: 1}, image_names=["nowhere.png"])
        empty = mmc4_document(2, {0: 1}, image_names=["d0_0.png"])
        empty["text_list"] = ["", "  "]
        docs += [low, missing, empty]
        counts = {"no_matched_image": 1, "missing_file": 1, "empty_text": 1}
        if not tar_shards:
            raw_bad = ['{"text_list": ["broken"']
            counts["bad_json"] = 1
    if not tar_shards:
        for name, data in files.items():
            _write(os.path.join(root, "images", name), data)
        path = write_jsonl(os.path.join(root, "docs.jsonl"), [*docs, *raw_bad])
        return {"path": path, "image_dir": os.path.join(root, "images"), "bad": counts, "n_good": n}
    per = -(-len(docs) // tar_shards)
    paths = []
    for s in range(tar_shards):
        members: list[tuple[str, bytes]] = []
        for k, doc in enumerate(docs[s * per:(s + 1) * per]):
            key = f"doc{s * per + k:05d}"
            members.append((f"{key}.json", json.dumps(doc).encode()))
            for info in doc["image_info"]:
                if info.get("image_name") in files:
                    members.append((info["image_name"], files[info["image_name"]]))
        paths.append(write_tar(os.path.join(root, f"docs-{s:06d}.tar"), members))
    return {"path": os.path.join(root, "docs-{%06d..%06d}.tar" % (0, tar_shards - 1)), "files": paths,
            "bad": counts, "n_good": n}


def tiny_processor(max_frames: int = 4, image_size: int = 32) -> FlamingoProcessor:
    """The tiny tokenizer (with Flamingo's tokens) + the tiny CLIP image processor."""
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    return FlamingoProcessor(tok, tiny_image_processor("clip", image_size), max_frames=max_frames)
