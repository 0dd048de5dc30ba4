"""`write_world`: write the mini world to disk in the data and evaluation formats (docs/data.md, docs/eval.md).

`write_world(root, size, seed)` writes, under `root`:

    data/pairs/pairs.jsonl              {"image": "images/p000000.png", "caption": ...}        (kind `pairs`)
    data/pairs/prompted.jsonl           the same images, texts in the evaluation prompts' styles  (kind `pairs`)
    data/interleaved/docs.jsonl         MMC4 documents, images beside the JSONL                  (kind `interleaved`)
    data/video/videos.jsonl             {"video": "videos/v000000.mp4", "caption": ...}          (kind `video`)
    data/multi/multi.jsonl              {"images": [...], "caption": "Image 0 is <image0>. ..."} (kind `pairs`)
    eval/vqa/{train,test}_{questions,annotations}.json + images/
    eval/captioning/captions.json + images/                       (COCO Karpathy layout)
    eval/classification/{classes.json,train.jsonl,test.jsonl} + images/
    eval/videoqa/{train,test}_qa.json + videos/                   (MSRVTT-QA layout)
    eval/binding/{classes.json,train.jsonl,test.jsonl} + images/  (classification layout with candidates/demo_ids)
    eval/multi_image/{train,test}.jsonl + images/                 (multi-image questions naming images by reference)
    eval/retrieval/pairs.jsonl + images/                          (held-out pairs: the vision tower's retrieval test)
    corpus/train.txt, corpus/heldout.txt                          (LM text, one document per line)
    samples/grid.png, samples/clip.png, samples/samples.json      (for the report)
    world.json                                                    (the manifest returned by `write_world`)

Every evaluation image is held out (fresh random streams); evaluation records carry `"novel": true` when their scene
uses a held-out (kind, colour) combination, which no training file ever shows.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path
from typing import Any, Sequence, Union

from tqdm import tqdm

from .files import write_json
from .sizes import DEFAULT_SIZE, MiniSize, get_size
from .world import COLOURS, KINDS
from .writers import WorldWriter

PathLike = Union[str, os.PathLike]


WRITER_GROUPS = (("pairs", "video", "vqa", "captioning", "multi_image"),
                 ("interleaved", "corpus", "classification", "videoqa", "binding", "retrieval", "multi"))
DATA_WRITERS = ("pairs", "interleaved", "video", "multi")
EVAL_WRITERS = ("vqa", "captioning", "classification", "videoqa", "binding", "retrieval", "multi_image")


def _worker(root: str, size: MiniSize, seed: int, names: Sequence[str], queue: Any) -> None:
    """A child process: run some writers, report progress every 100 items, then the results (or the error)."""
    try:
        writer, pending = WorldWriter(root, size, seed), [0]

        def tick(n: int) -> None:
            pending[0] += n
            if pending[0] >= 100:
                queue.put(("tick", pending[0]))
                pending[0] = 0

        writer.on_progress = tick
        results = writer.run(names)
        queue.put(("tick", pending[0]))
        queue.put(("done", results))
    except BaseException:  # report it to the parent, which raises
        queue.put(("error", traceback.format_exc()))


def _run_parallel(root: Path, size: MiniSize, seed: int, bar: tqdm) -> dict[str, tuple[dict, float]]:
    ctx = mp.get_context("fork")  # the writers need no torch; fork starts at once
    gc.collect()  # the parent's garbage is freed here, not in a child, where native pools it frees have no threads
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(root), size, seed, names, queue), daemon=True)
             for names in WRITER_GROUPS]
    for p in procs:
        p.start()
    results: dict[str, tuple[dict, float]] = {}
    finished = 0
    try:
        while finished < len(procs):
            kind, payload = queue.get()
            if kind == "tick":
                bar.update(payload)
            elif kind == "done":
                results.update(payload)
                finished += 1
            else:
                raise RuntimeError(f"a mini-world writer failed:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return results


def write_world(root: PathLike, size: Union[str, MiniSize] = DEFAULT_SIZE, seed: int = 0, workers: int = 2,
                progress: bool = True) -> dict:
    """Write every dataset of the mini world under `root`; return the manifest (also saved as root/world.json).

    workers: 2 writes in two forked processes (where `fork` exists), 1 in this process; the files are the same.
    """
    size = get_size(size) if isinstance(size, str) else size
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    writer = WorldWriter(root, size, seed)
    with tqdm(total=writer.total_items(), desc="mini world", unit="item", leave=False, disable=not progress) as bar:
        if workers > 1 and "fork" in mp.get_all_start_methods():
            results = _run_parallel(root, size, seed, bar)
        else:
            writer.on_progress = bar.update
            results = writer.run([n for group in WRITER_GROUPS for n in group])
    results.update(writer.run(["samples"]))
    w = writer.world
    manifest = {
        "root": str(root.resolve()), "seed": seed, "size": size.name, "image_size": size.image_size,
        "video_size": size.image_size * size.video_scale, "kinds": list(KINDS), "colours": list(COLOURS),
        "heldout_combos": sorted([list(p) for p in w.heldout_combos]),
        "data": {**{n: results[n][0] for n in DATA_WRITERS}, "prompted": results["pairs"][0].pop("prompted")},
        "eval": {n: results[n][0] for n in EVAL_WRITERS},
        "corpus": results["corpus"][0], "samples": results["samples"][0],
        "wall_s": round(time.perf_counter() - start, 2), "timings": {n: t for n, (_, t) in results.items()},
    }
    write_json(manifest, root / "world.json")
    return manifest
