"""Write the mini world to disk in the contract's formats (see /docs: training data and evaluation layouts).

`write_world(root, size, seed)` writes, under `root`:

    data/pairs/pairs.jsonl              {"image": "images/p000000.png", "caption": ...}        (kind `pairs`)
    data/pairs/prompted.jsonl           the same images, texts in the evaluation prompts' styles  (kind `pairs`)
    data/interleaved/docs.jsonl         MMC4 documents, images beside the JSONL                  (kind `interleaved`)
    data/video/videos.jsonl             {"video": "videos/v000000.mp4", "caption": ...}          (kind `video`)
    eval/vqa/{train,test}_{questions,annotations}.json + images/
    eval/captioning/captions.json + images/                       (COCO Karpathy layout)
    eval/classification/{classes.json,train.jsonl,test.jsonl} + images/
    eval/videoqa/{train,test}_qa.json + videos/                   (MSRVTT-QA layout)
    eval/binding/{classes.json,train.jsonl,test.jsonl} + images/  (classification layout with candidates/demo_ids)
    eval/retrieval/pairs.jsonl + images/                          (held-out pairs: the vision tower's retrieval test)
    corpus/train.txt, corpus/heldout.txt                          (LM text, one document per line)
    samples/grid.png, samples/clip.png, samples/samples.json      (for the report)
    world.json                                                    (the manifest returned by `write_world`)

Every evaluation image is held out (fresh random streams); evaluation records carry `"novel": true` when their scene
uses a held-out (kind, colour) combination, which no training file ever shows.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from .sizes import DEFAULT_SIZE, MiniSize, get_size
from .world import COLOURS, KINDS, Clip, Scene, Split, World

PathLike = Union[str, os.PathLike]

OPENERS = ("Some shapes from my notebook.", "Look at these pictures.", "Here is a page of drawings.",
           "I drew a few shapes today.", "A short photo story.")
CLOSERS = ("That is all for today.", "Thanks for looking.", "More shapes tomorrow.", "The end.")
COMMENTS = ("I like this one.", "It was easy to draw.", "Nice colour.", "This one took a while.")
MAX_BINDING_WAYS = 3  # an evaluation binding episode binds 2 or 3 words
BINDING_OPENERS = ("Some new words.", "Let me teach you two words.", "Learn these names.")


def stream(seed: int, name: str) -> np.random.Generator:
    """An independent random stream per dataset, so that resizing one dataset leaves the others unchanged."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def save_image(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def save_video(frames: np.ndarray, path: Path, fps: float = 1.0) -> None:
    """(F, H, W, 3) uint8 -> mp4 (libx264 when available, else mpeg4; yuv420p, so H and W must be even)."""
    import av  # only the video writers need PyAV
    from fractions import Fraction

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must be (F, H, W, 3) with even H, W, got {frames.shape}")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"} if codec == "libx264" else {"qscale": "2"}
        stream.codec_context.thread_count = 1  # deterministic bytes
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_json(obj: Any, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def _write_jsonl(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


class WorldWriter:
    """Writes every dataset of one world. Each `write_*` method returns its manifest entry."""

    def __init__(self, root: PathLike, size: MiniSize, seed: int = 0):
        self.root, self.size, self.seed = Path(root), size, seed
        self.world = World(seed, size.image_size, novel_prob=size.novel_prob)
        self.interleaved_texts: list[str] = []  # text of the training documents, reused by the LM corpus
        self.on_progress: Optional[Callable[[int], Any]] = None

    def _dir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _tick(self, n: int = 1) -> None:
        if self.on_progress is not None:
            self.on_progress(n)

    # ---------------------------------------------------------------------------------------------- training
    def write_pairs(self) -> dict:
        rng, d = stream(self.seed, "pairs"), self._dir("data", "pairs")
        images, rows, prompted_rows = self._dir("data", "pairs", "images"), [], []
        prompted_rng = stream(self.seed, "pairs/prompted")  # its own stream: the captions do not depend on it
        for i in range(self.size.pairs):
            scene = self.world.sample_scene(rng, "train")
            save_image(self.world.render(scene), images / f"p{i:06d}.png")
            rows.append({"image": f"images/p{i:06d}.png", "caption": self.world.caption(scene, rng)})
            text = prompted_text(self.world, scene, prompted_rng, self.size.prompted_caption_fraction)
            prompted_rows.append({"image": f"images/p{i:06d}.png", "caption": text})
            self._tick()
        _write_jsonl(rows, d / "pairs.jsonl")
        _write_jsonl(prompted_rows, d / "prompted.jsonl")
        return {"path": str(d / "pairs.jsonl"), "count": len(rows),
                "prompted": {"path": str(d / "prompted.jsonl"), "count": len(prompted_rows)}}

    def write_video(self) -> dict:
        rng, d = stream(self.seed, "video"), self._dir("data", "video")
        videos, rows = self._dir("data", "video", "videos"), []
        for i in range(self.size.videos):
            clip = self.world.sample_clip(rng, "train", self.size.video_frames)
            self._save_clip(clip, videos / f"v{i:06d}.mp4")
            if rng.random() < self.size.video_qa_fraction:  # some video pages ask about the clip
                caption = clip_question_text(self.world, clip, rng)
            else:
                caption = self.world.clip_caption(clip, rng)
            rows.append({"video": f"videos/v{i:06d}.mp4", "caption": caption})
            self._tick()
        _write_jsonl(rows, d / "videos.jsonl")
        return {"path": str(d / "videos.jsonl"), "count": len(rows), "frames": self.size.video_frames,
                "fps": self.size.video_fps}

    def _save_clip(self, clip: Clip, path: Path) -> None:
        frames = self.world.render_clip(clip)  # (F, H, W, 3) at the still size, then pixel-repeated
        k = self.size.video_scale
        save_video(np.repeat(np.repeat(frames, k, axis=1), k, axis=2), path, self.size.video_fps)

    def write_interleaved(self) -> dict:
        """MMC4 documents: scene stories (2-5 images, references between them), quiz pages and concept-binding
        episodes."""
        rng, d = stream(self.seed, "interleaved"), self._dir("data", "interleaved")
        rows, n_images, n_binding, n_quiz, words = [], 0, 0, 0, set()
        for i in range(self.size.docs):
            key = f"doc{i:06d}"
            r = rng.random()
            if r < self.size.binding_fraction:
                texts, scenes, matched, doc_words = binding_document(self.world, rng, "train")
                words.update(doc_words)
                n_binding += 1
            elif r < self.size.binding_fraction + self.size.quiz_fraction:
                texts, scenes, matched = quiz_document(self.world, rng)
                n_quiz += 1
            else:
                texts, scenes, matched = story_document(self.world, rng)
            info, sims = [], []
            for j, (scene, m) in enumerate(zip(scenes, matched)):
                name = f"{key}_{j}.png"
                save_image(self.world.render(scene), d / name)
                sim = float(rng.uniform(0.9, 0.98))
                info.append({"image_name": name, "matched_text_index": m, "matched_sim": round(sim, 4)})
                row = [round(float(v), 4) for v in rng.uniform(0.0, 0.2, len(texts))]
                row[m] = round(sim, 4)
                sims.append(row)
            rows.append({"key": key, "text_list": texts, "image_info": info, "similarity_matrix": sims})
            self.interleaved_texts.append(" ".join(texts))
            n_images += len(scenes)
            self._tick()
        _write_jsonl(rows, d / "docs.jsonl")
        return {"path": str(d / "docs.jsonl"), "image_dir": str(d), "docs": len(rows), "images": n_images,
                "binding_docs": n_binding, "quiz_docs": n_quiz, "binding_words": len(words)}

    # -------------------------------------------------------------------------------------------- evaluation
    def write_vqa(self) -> dict:
        rng, d = stream(self.seed, "eval/vqa"), self._dir("eval", "vqa")
        images, qid = self._dir("eval", "vqa", "images"), 0
        counts = {}
        for split, n in zip(("train", "test"), self.size.vqa):
            questions, annotations = [], []
            for _ in range(n):
                scene = self.world.sample_scene(rng, "eval")
                qtype, question, answer = _pick(self.world.questions(scene), rng)
                name = f"{split}_{qid:06d}.png"
                save_image(self.world.render(scene), images / name)
                questions.append({"question_id": qid, "image_id": qid, "question": question,
                                  "image": f"images/{name}"})
                annotations.append({"question_id": qid, "image_id": qid, "question_type": qtype,
                                    "answers": [{"answer": answer, "answer_id": k + 1} for k in range(10)],
                                    "multiple_choice_answer": answer, "novel": scene.novel})
                qid += 1
                self._tick()
            _write_json({"questions": questions}, d / f"{split}_questions.json")
            _write_json({"annotations": annotations}, d / f"{split}_annotations.json")
            counts[split] = n
        return {"dir": str(d), **counts}

    def write_captioning(self) -> dict:
        rng, d = stream(self.seed, "eval/captioning"), self._dir("eval", "captioning")
        images_dir, entries = self._dir("eval", "captioning", "images"), []
        for split, n in zip(("train", "test"), self.size.captioning):
            for _ in range(n):
                scene, cid = self.world.sample_scene(rng, "eval"), len(entries)
                name = f"{split}_{cid:06d}.png"
                save_image(self.world.render(scene), images_dir / name)
                entries.append({"filepath": "images", "filename": name, "split": split, "cocoid": cid,
                                "sentences": [{"raw": c, "tokens": c.rstrip(".").replace(",", "").split()}
                                              for c in self.world.captions(scene)], "novel": scene.novel})
                self._tick()
        _write_json({"images": entries, "dataset": "mini"}, d / "captions.json")
        return {"dir": str(d), "train": self.size.captioning[0], "test": self.size.captioning[1]}

    def write_classification(self) -> dict:
        rng, d = stream(self.seed, "eval/classification"), self._dir("eval", "classification")
        images = self._dir("eval", "classification", "images")
        _write_json(list(KINDS), d / "classes.json")
        for split, n in zip(("train", "test"), self.size.classification):
            rows = []
            for i in range(n):
                scene = self.world.sample_scene(rng, "eval", kind=KINDS[i % len(KINDS)], count=1)
                name = f"{split}_{i:06d}.png"
                save_image(self.world.render(scene), images / name)
                rows.append({"id": f"{split}_{i:06d}", "image": f"images/{name}", "label": scene.kind,
                             "novel": scene.novel})
                self._tick()
            _write_jsonl(rows, d / f"{split}.jsonl")
        return {"dir": str(d), "train": self.size.classification[0], "test": self.size.classification[1],
                "classes": len(KINDS)}

    def write_videoqa(self) -> dict:
        rng, d = stream(self.seed, "eval/videoqa"), self._dir("eval", "videoqa")
        videos, vid = self._dir("eval", "videoqa", "videos"), 0
        for split, n in zip(("train", "test"), self.size.videoqa):
            rows = []
            for _ in range(n):
                clip = self.world.sample_clip(rng, "eval", self.size.video_frames)
                qa = self.world.clip_questions(clip)
                # Half the questions ask the headline attribute (direction / new colour), the rest the others.
                qtype, question, answer = qa[0] if rng.random() < 0.5 else qa[1 + int(rng.integers(2))]
                name = f"{split}_{vid:06d}.mp4"
                self._save_clip(clip, videos / name)
                rows.append({"id": vid, "video": f"videos/{name}", "question": question, "answer": answer,
                             "question_type": qtype, "novel": clip.first.novel or any(f.novel for f in clip.frames)})
                vid += 1
                self._tick()
            _write_json(rows, d / f"{split}_qa.json")
        return {"dir": str(d), "train": self.size.videoqa[0], "test": self.size.videoqa[1],
                "frames": self.size.video_frames, "fps": self.size.video_fps}

    def write_retrieval(self) -> dict:
        """Held-out image-text pairs (canonical captions) for the vision tower's retrieval accuracy."""
        rng, d = stream(self.seed, "eval/retrieval"), self._dir("eval", "retrieval")
        images, rows = self._dir("eval", "retrieval", "images"), []
        for i in range(self.size.retrieval_pairs):
            scene = self.world.sample_scene(rng, "eval")
            save_image(self.world.render(scene), images / f"r{i:06d}.png")
            rows.append({"image": f"images/r{i:06d}.png", "caption": self.world.captions(scene)[0],
                         "novel": scene.novel})
            self._tick()
        _write_jsonl(rows, d / "pairs.jsonl")
        return {"path": str(d / "pairs.jsonl"), "count": len(rows)}

    def write_binding(self) -> dict:
        """Concept-binding episodes (Frozen's fast binding) in the classification layout.

        Episode e binds n_way (2 or 3) fresh evaluation-only nonsense words to object kinds. Its
        `binding_shots` * n_way demos (train split) alternate the kinds, so its first k * n_way demos show each kind
        k times: shots count per word, as in Frozen's fast binding (its record's `ways` tells the harness). Its
        query (test split) is a new image of one of the kinds, labelled with that kind's word, ranked among
        `candidates`. At 8 shots a 3-way prompt holds 25 images: on the seed-0 world 2 of the 150 prompts ran past
        the binding size's 256-token LM windows (268 tokens at most; its 2-way prompts, 180; docs/demo.md).
        """
        rng, d = stream(self.seed, "eval/binding"), self._dir("eval", "binding")
        images, train, test = self._dir("eval", "binding", "images"), [], []
        words = list(self.world.eval_words)
        order = rng.permutation(len(words))
        used = 0
        for e in range(self.size.binding_episodes):
            n_way = 2 if rng.random() < 0.5 else MAX_BINDING_WAYS
            kinds = [KINDS[k] for k in rng.choice(len(KINDS), n_way, replace=False)]
            episode_words = [words[order[(used + k) % len(words)]] for k in range(n_way)]
            used += n_way
            demo_ids = []
            for j in range(self.size.binding_shots * n_way):
                k = j % n_way
                scene = self.world.sample_scene(rng, "eval", kind=kinds[k], count=1)
                sid = f"ep{e:05d}_d{j}"
                save_image(self.world.render(scene), images / f"{sid}.png")
                train.append({"id": sid, "image": f"images/{sid}.png", "label": episode_words[k], "episode": e,
                              "kind": kinds[k]})
                demo_ids.append(sid)
                self._tick()
            k = int(rng.integers(n_way))
            scene = self.world.sample_scene(rng, "eval", kind=kinds[k], count=1)
            sid = f"ep{e:05d}_q"
            save_image(self.world.render(scene), images / f"{sid}.png")
            test.append({"id": sid, "image": f"images/{sid}.png", "label": episode_words[k],
                         "candidates": episode_words, "demo_ids": demo_ids, "ways": n_way, "episode": e,
                         "kind": kinds[k], "novel": scene.novel})
            self._tick(1 + self.size.binding_shots * (MAX_BINDING_WAYS - n_way))  # total_items counts 3 ways
        _write_json(sorted({w for row in test for w in row["candidates"]}), d / "classes.json")
        _write_jsonl(train, d / "train.jsonl")
        _write_jsonl(test, d / "test.jsonl")
        chance = float(np.mean([1 / len(row["candidates"]) for row in test])) if test else 0.0
        return {"dir": str(d), "train": len(train), "test": len(test), "chance": chance}

    # ------------------------------------------------------------------------------------------- corpus, samples
    def write_corpus(self) -> dict:
        """Plain text for LM pretraining: world sentences, the eval harness's prompt formats, binding text, and the
        training documents' text. The held-out part comes from its own stream (same distribution, fresh lines).
        Where the size asks, induction documents go to their own file: the LM trains on them too, the tokenizer
        does not (its merges stay those of the world's language)."""
        d = self._dir("corpus")
        train = corpus_documents(self.world, stream(self.seed, "corpus"), self.size.corpus_docs,
                                 self.size.video_frames) + self.interleaved_texts
        order = stream(self.seed, "corpus/order").permutation(len(train))
        heldout = corpus_documents(self.world, stream(self.seed, "corpus/heldout"), self.size.heldout_docs,
                                   self.size.video_frames)
        files = {"train": [train[i] for i in order], "heldout": heldout}
        if self.size.copy_docs or self.size.assoc_docs:  # own stream and file: the other documents stay as they were
            files["induction"] = induction_documents(self.world, stream(self.seed, "corpus/induction"),
                                                     self.size.copy_docs, self.size.assoc_docs)
        for name, docs in files.items():
            with open(d / f"{name}.txt", "w") as f:
                f.write("\n".join(docs) + "\n")
        self._tick(len(train))
        out = {name: str(d / f"{name}.txt") for name in files}
        out.update(docs=len(train), heldout_docs=len(heldout), chars=sum(len(t) for t in train))
        if "induction" in files:
            out["induction_docs"] = len(files["induction"])
        return out

    def write_samples(self) -> dict:
        """A grid of evaluation-style stills (upscaled 4x, nearest) and one clip's frames, with their captions."""
        rng, d = stream(self.seed, "samples"), self._dir("samples")
        scenes = [self.world.sample_scene(rng, "eval") for _ in range(self.size.samples)]
        cols = int(np.ceil(np.sqrt(len(scenes))))
        s = self.size.image_size
        grid = np.zeros((s * ((len(scenes) + cols - 1) // cols), s * cols, 3), np.uint8)
        items = []
        for i, scene in enumerate(scenes):
            image = self.world.render(scene)
            grid[(i // cols) * s:(i // cols + 1) * s, (i % cols) * s:(i % cols + 1) * s] = image
            save_image(image, d / f"sample_{i:02d}.png")
            items.append({"image": f"sample_{i:02d}.png", "caption": self.world.captions(scene)[0],
                          "novel": scene.novel})
        save_image(np.kron(grid, np.ones((4, 4, 1), np.uint8)), d / "grid.png")
        clip = self.world.sample_clip(rng, "eval", self.size.video_frames, motion="move")
        strip = np.concatenate(list(self.world.render_clip(clip)), axis=1)
        save_image(np.kron(strip, np.ones((4, 4, 1), np.uint8)), d / "clip.png")
        _write_json({"images": items, "grid": "grid.png", "clip": "clip.png",
                     "clip_caption": self.world.clip_captions(clip)[1]}, d / "samples.json")
        return {"dir": str(d), "grid": str(d / "grid.png"), "clip": str(d / "clip.png"), "count": len(items)}

    def run(self, names: Sequence[str]) -> dict[str, tuple[dict, float]]:
        """Run the named writers (`pairs` -> `write_pairs`, ...) in order: {name: (manifest entry, seconds)}."""
        done = {}
        for name in names:
            t0 = time.perf_counter()
            done[name] = (getattr(self, f"write_{name}")(), round(time.perf_counter() - t0, 2))
        return done

    def total_items(self) -> int:
        s = self.size
        return (s.pairs + s.videos + 2 * s.docs + sum(s.vqa) + sum(s.captioning) + sum(s.classification)
                + sum(s.videoqa) + s.retrieval_pairs + s.binding_episodes * (s.binding_shots * MAX_BINDING_WAYS + 1)
                + s.corpus_docs)


# Two balanced groups of writers for two processes; the corpus reuses the interleaved documents' text, so it runs
# after them in the same group. Every writer has its own random stream: the split does not change the output.
WRITER_GROUPS = (("pairs", "video", "vqa", "captioning"),
                 ("interleaved", "corpus", "classification", "videoqa", "binding", "retrieval"))
DATA_WRITERS = ("pairs", "interleaved", "video")
EVAL_WRITERS = ("vqa", "captioning", "classification", "videoqa", "binding", "retrieval")


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
        import traceback

        queue.put(("error", traceback.format_exc()))


def _run_parallel(root: Path, size: MiniSize, seed: int, bar: tqdm) -> dict[str, tuple[dict, float]]:
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the writers need no torch; fork starts at once
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
    import multiprocessing as mp

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
    _write_json(manifest, root / "world.json")
    return manifest


def _pick(options: Sequence[Any], rng: np.random.Generator) -> Any:
    return options[int(rng.integers(len(options)))]


# ------------------------------------------------------------------------------------------------- documents
def story_document(world: World, rng: np.random.Generator) -> tuple[list[str], list[Scene], list[int]]:
    """A scene story: 2-5 training images, each matched to a sentence; some sentences refer to the previous or next
    image ("the next one is also red", "unlike the previous one, this is a square"), some have no image."""
    n = int(rng.integers(2, 6))
    scenes: list[Scene] = []
    for i in range(n):
        prev = scenes[-1] if scenes else None
        r = rng.random()
        if prev is not None and r < 0.35:  # same colour, other kind when the pair is allowed
            kind = _pick([k for k in KINDS if k != prev.kind and world.allowed(k, prev.colour, "train")], rng)
            scenes.append(world.sample_scene(rng, "train", kind=kind, colour=prev.colour))
        elif prev is not None and r < 0.55:  # same kind
            scenes.append(world.sample_scene(rng, "train", kind=prev.kind))
        else:
            scenes.append(world.sample_scene(rng, "train"))
    texts: list[str] = []
    matched: list[int] = []
    if rng.random() < 0.6:
        texts.append(_pick(OPENERS, rng))
    for i, scene in enumerate(scenes):
        prev = scenes[i - 1] if i else None
        if prev is not None and rng.random() < 0.3:  # an imageless sentence announcing this image
            if scene.colour == prev.colour:
                texts.append(f"The next one is also {scene.colour}.")
            elif scene.kind == prev.kind:
                texts.append(f"The next one is another {scene.kind}.")
            else:
                texts.append("The next one is different.")
        caption = world.caption(scene, rng)
        if prev is not None and rng.random() < 0.4:
            if scene.colour == prev.colour and scene.kind != prev.kind:
                caption = f"This one is also {scene.colour}: {caption}"
            elif scene.kind != prev.kind:
                caption = f"Unlike the previous one, this is a {scene.kind}: {caption}"
            elif scene.colour != prev.colour:
                caption = f"The same shape as before, now {scene.colour}: {caption}"
        matched.append(len(texts))
        texts.append(caption[0].upper() + caption[1:])
        if rng.random() < 0.15:
            texts.append(_pick(COMMENTS, rng))
    if rng.random() < 0.4:
        texts.append(_pick(CLOSERS, rng))
    return texts, scenes, matched


def question_text(world: World, scene: Scene, rng: np.random.Generator) -> str:
    """A random question about a still and its short answer, in the VQA prompt of flamingo/eval/vqa.py."""
    _, question, answer = _pick(world.questions(scene), rng)
    return f"Question:{question} Short answer:{answer}"


def clip_question_text(world: World, clip: Clip, rng: np.random.Generator) -> str:
    """A random question about a clip and its answer, in the video QA prompt of flamingo/eval/videoqa.py."""
    _, question, answer = _pick(world.clip_questions(clip), rng)
    return f"Question:{question} Answer:{answer}"


def prompted_text(world: World, scene: Scene, rng: np.random.Generator, caption_fraction: float) -> str:
    """Alt text in the styles of quiz and caption pages, which are also the harness's prompts (flamingo/eval/vqa.py,
    captioning.py): a question about the image and its short answer (`Question:{q} Short answer:{a}`), or, for
    `caption_fraction` of the images, `Output:{caption}`. Both styles are needed: trained on questions alone, the
    model answered the captioning prompt `<image>Output:` with a question."""
    if rng.random() < caption_fraction:
        return f"Output:{world.caption(scene, rng)}"
    return question_text(world, scene, rng)


def quiz_document(world: World, rng: np.random.Generator) -> tuple[list[str], list[Scene], list[int]]:
    """A quiz page (web pages have them too): 2-5 training images, each followed by a question about it and its short
    answer, or by what it is, in the same words as the evaluation prompts ("Question:... Short answer:red")."""
    n = int(rng.integers(2, 6))
    texts: list[str] = []
    scenes: list[Scene] = []
    matched: list[int] = []
    if rng.random() < 0.5:
        texts.append(_pick(OPENERS, rng))
    for _ in range(n):
        scene = world.sample_scene(rng, "train")
        scenes.append(scene)
        matched.append(len(texts))
        if rng.random() < 0.8:
            texts.append(question_text(world, scene, rng))
        else:
            texts.append(f"This is a {scene.kind}.")
    return texts, scenes, matched


def binding_document(world: World, rng: np.random.Generator, split: Split = "train"
                     ) -> tuple[list[str], list[Scene], list[int], list[str]]:
    """A concept-binding episode in 5 images: n_way (2-3) fresh nonsense words are introduced on images of n_way
    kinds ("This is a dax."), then more images of the same kinds carry their words again."""
    n_way = 2 if rng.random() < 0.6 else 3
    kinds = [KINDS[k] for k in rng.choice(len(KINDS), n_way, replace=False)]
    words = world.train_words(rng, n_way)
    sequence = list(rng.permutation(n_way)) + [int(rng.integers(n_way)) for _ in range(5 - n_way)]
    texts: list[str] = []
    if rng.random() < 0.3:
        texts.append(_pick(BINDING_OPENERS, rng))
    scenes, matched = [], []
    for k in sequence:
        scenes.append(world.sample_scene(rng, split, kind=kinds[k], count=1))
        matched.append(len(texts))
        texts.append(f"This is a {words[k]}." if rng.random() < 0.8 else f"Here is a {words[k]}.")
    return texts, scenes, matched, words


def corpus_documents(world: World, rng: np.random.Generator, n: int, num_frames: int) -> list[str]:
    """Text-only documents: descriptions, the eval prompts (`Question:{q} Short answer:{a}`, `Output:{caption}`,
    `This is a {label}`), video captions and questions, and text-only binding (`a dax is a circle. ...`)."""
    docs = []
    kinds = ("describe", "vqa", "caption", "classify", "video", "bind_text", "bind_echo")
    weights = np.array([0.2, 0.22, 0.14, 0.08, 0.16, 0.12, 0.08])
    for _ in range(n):
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        m = int(rng.integers(1, 5))
        if kind == "describe":
            text = " ".join(world.caption(world.sample_scene(rng, "train"), rng) for _ in range(m + 2))
        elif kind == "vqa":
            text = " ".join(question_text(world, world.sample_scene(rng, "train"), rng) for _ in range(m))
        elif kind == "caption":
            text = " ".join(f"Output:{world.caption(world.sample_scene(rng, 'train'), rng)}" for _ in range(m))
        elif kind == "classify":
            text = " ".join(f"This is a {_pick(KINDS, rng)}." for _ in range(m))
        elif kind == "video":
            parts = []
            for _ in range(m):
                clip = world.sample_clip(rng, "train", num_frames)
                if rng.random() < 0.5:
                    parts.append(world.clip_caption(clip, rng))
                else:
                    parts.append(clip_question_text(world, clip, rng))
            text = " ".join(parts)
        elif kind == "bind_text":
            n_way = int(rng.integers(2, 4))
            ks = [KINDS[k] for k in rng.choice(len(KINDS), n_way, replace=False)]
            ws = world.train_words(rng, n_way)
            parts = [f"a {w} is a {k}." for w, k in zip(ws, ks)]
            for _ in range(m + 1):
                j = int(rng.integers(n_way))
                parts.append(f"here is a {ks[j]}: this is a {ws[j]}.")
            text = " ".join(parts)
        else:
            n_way = int(rng.integers(2, 4))
            ws = world.train_words(rng, n_way)
            seq = list(rng.permutation(n_way)) + [int(rng.integers(n_way)) for _ in range(m)]
            text = " ".join(f"This is a {ws[j]}." for j in seq)
        docs.append(text[0].upper() + text[1:])
    return docs


def induction_documents(world: World, rng: np.random.Generator, copies: int, assocs: int) -> list[str]:
    """Text that an LM can only predict by looking back in its context (Olsson et al. 2022's induction heads; the
    binding task rests on them), made of fresh training-only nonsense words:
    - `copies` copy documents: 3-8 words, then the same words again, 2 or 3 times in all
      (`wug dax fep. wug dax fep.`);
    - `assocs` association documents: 2-3 kinds each bound to a word, restated in a random order
      (`This is a circle dax. This is a star fep. This is a circle dax.`): after a kind, the word that followed it."""
    docs = []
    for _ in range(copies):
        words = world.train_words(rng, int(rng.integers(3, 9)))
        docs.append(" ".join([" ".join(words) + "."] * int(rng.integers(2, 4))))
    for _ in range(assocs):
        n_way = int(rng.integers(2, 4))
        kinds = [KINDS[k] for k in rng.choice(len(KINDS), n_way, replace=False)]
        words = world.train_words(rng, n_way)
        order = list(rng.permutation(n_way)) + [int(rng.integers(n_way)) for _ in range(int(rng.integers(2, 6)))]
        docs.append(" ".join(f"This is a {kinds[j]} {words[j]}." for j in order))
    return docs
