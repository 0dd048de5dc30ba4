"""Data loader throughput: samples/s of each loader (decode + tokenize + preprocess + collate), 0 and 2 workers.

    python -m bench.data                      # default fixture sizes, CLIP preprocessing at 224 px
    python -m bench.data --samples 64 --image-size 64   # a quick smoke run
    python -m bench.data --cache-media-mb 0 512         # also with the media cache (options.cache_media_mib)

Fixture data is written on the fly to a temp dir: `pairs` = JPEG images (256 x 256) + captions in a JSONL;
`interleaved` = MMC4 documents (8 sentences, 3 matched 256 x 256 JPEG images each) in a JSONL; `video` = 4 s mp4 clips
(8 fps, 128 x 128) decoded at 1 FPS. One full epoch is timed per setting (worker start-up included) after one
warm-up epoch; the figure is good samples / wall seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import tempfile
import time
import warnings
from typing import Any

import numpy as np
from PIL import Image

from bench.common import print_json, print_table
from flamingo.data import build_source
from flamingo.data.fixtures import mmc4_document, video_bytes, write_jsonl
from flamingo.processing import FlamingoProcessor, add_flamingo_tokens
from flamingo.tiny import tiny_image_processor, tiny_tokenizer
from flamingo.train.config import DatasetSection


def _jpeg(i: int, size: int) -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_fixtures(root: str, samples: int) -> dict[str, DatasetSection]:
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    os.makedirs(os.path.join(root, "vid"), exist_ok=True)
    n_images = samples * 3
    for i in range(n_images):
        with open(os.path.join(root, "img", f"{i}.jpg"), "wb") as f:
            f.write(_jpeg(i, 256))
    write_jsonl(os.path.join(root, "pairs.jsonl"),
                [{"image": f"img/{i}.jpg", "caption": f"a photo of object number {i} on a table"}
                 for i in range(samples)])
    docs = []
    for d in range(samples):
        doc = mmc4_document(8, {0: 1, 1: 4, 2: 6}, image_names=[f"{3 * d + k}.jpg" for k in range(3)])
        docs.append(doc)
    write_jsonl(os.path.join(root, "docs.jsonl"), docs)
    clip = video_bytes(4, rate=8, size=128)
    n_videos = max(8, samples // 4)
    for i in range(n_videos):
        with open(os.path.join(root, "vid", f"{i}.mp4"), "wb") as f:
            f.write(clip)
    write_jsonl(os.path.join(root, "videos.jsonl"),
                [{"video": f"vid/{i}.mp4", "caption": f"clip number {i}"} for i in range(n_videos)])
    return {
        "pairs": DatasetSection("pairs", "pairs", os.path.join(root, "pairs.jsonl"), 8),
        "interleaved": DatasetSection("interleaved", "interleaved", os.path.join(root, "docs.jsonl"), 8,
                                      options={"image_dir": os.path.join(root, "img")}),
        "video": DatasetSection("video", "video", os.path.join(root, "videos.jsonl"), 4,
                                options={"fps": 1.0, "max_frames": 8}),
    }


def measure(section: DatasetSection, processor: FlamingoProcessor, workers: int, cache_mib: float = 0
            ) -> dict[str, Any]:
    section = dataclasses.replace(section, options={**(section.options or {}), "cache_media_mib": cache_mib})
    source = build_source(section, processor, num_workers=workers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(source)  # warm-up epoch (page cache, lazy imports; fills the media cache when on, in-process)
        start = time.perf_counter()
        batches = list(source)
        seconds = time.perf_counter() - start
    samples = sum(b["input_ids"].shape[0] for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    frames = sum(int(b["num_frames"].sum()) for b in batches)
    return {"loader": section.kind, "workers": workers, "cache_mib": cache_mib, "samples": samples, "seconds": seconds,
            "samples_per_s": samples / seconds, "frames_per_s": frames / seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256, help="pairs / documents (videos: a quarter)")
    parser.add_argument("--image-size", type=int, default=224, help="the image processor's output size")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--cache-media-mb", type=float, nargs="+", default=[0],
                        help="dataset option cache_media_mib (0: off); the timed epoch is the second one")
    args = parser.parse_args()
    # each worker stream needs a batch of 8 pairs or documents (and of 4 of the max(8, samples // 4) videos)
    if args.samples < 8 * max(1, *args.workers):
        parser.error(f"--samples {args.samples} leaves a stream of {max(args.workers)} workers no batch of 8: "
                     f"use at least {8 * max(1, *args.workers)}")
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    processor = FlamingoProcessor(tok, tiny_image_processor("clip", args.image_size), max_frames=8)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        sections = make_fixtures(root, args.samples)
        for section in sections.values():
            for workers in args.workers:
                for cache_mib in args.cache_media_mb:
                    rows.append(measure(section, processor, workers, cache_mib))
    print_table(rows, ["loader", "workers", "cache_mib", "samples", "seconds", "samples_per_s", "frames_per_s",
                       "tokens_per_s"])
    print_json("data", {"cpu_count": os.cpu_count(), "image_size": args.image_size, "rows": rows})


if __name__ == "__main__":
    main()
