"""`WorldWriter`: writes each dataset of one mini world (`write_world` in build_world.py runs it).

Every evaluation image is held out (fresh random streams); evaluation records carry `"novel": true` when their scene
uses a held-out (kind, colour) combination, which no training file ever shows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from flamingo.eval.multi_image import declarations, in_words

from .files import save_image, save_video, stream, write_json, write_jsonl
from .sizes import MiniSize
from .texts import (
    MAX_BINDING_WAYS,
    binding_document,
    clip_question_text,
    corpus_documents,
    induction_documents,
    multi_image_question,
    pick,
    prompted_text,
    quiz_document,
    story_document,
)
from .world import KINDS, Clip, Scene, World

PathLike = Union[str, os.PathLike]


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
        write_jsonl(rows, d / "pairs.jsonl")
        write_jsonl(prompted_rows, d / "prompted.jsonl")
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
        write_jsonl(rows, d / "videos.jsonl")
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
        write_jsonl(rows, d / "docs.jsonl")
        return {"path": str(d / "docs.jsonl"), "image_dir": str(d), "docs": len(rows), "images": n_images,
                "binding_docs": n_binding, "quiz_docs": n_quiz, "binding_words": len(words)}

    def _save_scenes(self, scenes: Sequence[Scene], d: Path, stem: str) -> list[str]:
        """Render scenes to `d/{stem}_{k}.png`; their names relative to `d`, in order."""
        names = [f"{stem}_{k}.png" for k in range(len(scenes))]
        for name, scene in zip(names, scenes):
            save_image(self.world.render(scene), d / name)
        return names

    def write_multi(self) -> dict:
        """Multi-image pairs (MMICL-style, docs/data.md): 2-3 images declared in the caption and a question naming
        one or two of them, in the evaluation prompt's words (flamingo/eval/multi_image.py). `multi_plain_fraction`
        of them name the images in words (`image 0`) instead of by reference, as the plain prompt does."""
        rng, d = stream(self.seed, "multi"), self._dir("data", "multi")
        self._dir("data", "multi", "images")
        rows = []
        for i in range(self.size.multi_docs):
            scenes, _, question, answer = multi_image_question(self.world, rng, "train")
            if rng.random() < self.size.multi_plain_fraction:
                question = in_words(question)
            names = self._save_scenes(scenes, d, f"images/m{i:06d}")
            rows.append({"images": names,
                         "caption": f"{declarations(len(scenes))}Question:{question} Short answer:{answer}"})
            self._tick()
        write_jsonl(rows, d / "multi.jsonl")
        return {"path": str(d / "multi.jsonl"), "count": len(rows), "images": sum(len(r["images"]) for r in rows)}

    # -------------------------------------------------------------------------------------------- evaluation
    def write_vqa(self) -> dict:
        rng, d = stream(self.seed, "eval/vqa"), self._dir("eval", "vqa")
        images, qid = self._dir("eval", "vqa", "images"), 0
        counts = {}
        for split, n in zip(("train", "test"), self.size.vqa):
            questions, annotations = [], []
            for _ in range(n):
                scene = self.world.sample_scene(rng, "eval")
                qtype, question, answer = pick(self.world.questions(scene), rng)
                name = f"{split}_{qid:06d}.png"
                save_image(self.world.render(scene), images / name)
                questions.append({"question_id": qid, "image_id": qid, "question": question,
                                  "image": f"images/{name}"})
                annotations.append({"question_id": qid, "image_id": qid, "question_type": qtype,
                                    "answers": [{"answer": answer, "answer_id": k + 1} for k in range(10)],
                                    "multiple_choice_answer": answer, "novel": scene.novel})
                qid += 1
                self._tick()
            write_json({"questions": questions}, d / f"{split}_questions.json")
            write_json({"annotations": annotations}, d / f"{split}_annotations.json")
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
        write_json({"images": entries, "dataset": "mini"}, d / "captions.json")
        return {"dir": str(d), "train": self.size.captioning[0], "test": self.size.captioning[1]}

    def write_classification(self) -> dict:
        rng, d = stream(self.seed, "eval/classification"), self._dir("eval", "classification")
        images = self._dir("eval", "classification", "images")
        write_json(list(KINDS), d / "classes.json")
        for split, n in zip(("train", "test"), self.size.classification):
            rows = []
            for i in range(n):
                scene = self.world.sample_scene(rng, "eval", kind=KINDS[i % len(KINDS)], count=1)
                name = f"{split}_{i:06d}.png"
                save_image(self.world.render(scene), images / name)
                rows.append({"id": f"{split}_{i:06d}", "image": f"images/{name}", "label": scene.kind,
                             "novel": scene.novel})
                self._tick()
            write_jsonl(rows, d / f"{split}.jsonl")
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
            write_json(rows, d / f"{split}_qa.json")
        return {"dir": str(d), "train": self.size.videoqa[0], "test": self.size.videoqa[1],
                "frames": self.size.video_frames, "fps": self.size.video_fps}

    def write_multi_image(self) -> dict:
        """Multi-image questions on held-out images, in the `multi_image` task's layout (flamingo/eval/multi_image.py);
        the `multi_image_plain` task reads the same records."""
        rng, d = stream(self.seed, "eval/multi_image"), self._dir("eval", "multi_image")
        self._dir("eval", "multi_image", "images")
        for split, n in zip(("train", "test"), self.size.multi_image):
            rows = []
            for i in range(n):
                scenes, qtype, question, answer = multi_image_question(self.world, rng, "eval")
                names = self._save_scenes(scenes, d, f"images/{split}_{i:06d}")
                rows.append({"id": f"{split}_{i:06d}", "images": names, "question": question, "answer": answer,
                             "type": qtype, "novel": any(s.novel for s in scenes)})
                self._tick()
            write_jsonl(rows, d / f"{split}.jsonl")
        return {"dir": str(d), "train": self.size.multi_image[0], "test": self.size.multi_image[1]}

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
        write_jsonl(rows, d / "pairs.jsonl")
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
        write_json(sorted({w for row in test for w in row["candidates"]}), d / "classes.json")
        write_jsonl(train, d / "train.jsonl")
        write_jsonl(test, d / "test.jsonl")
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
        write_json({"images": items, "grid": "grid.png", "clip": "clip.png",
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
                + s.corpus_docs + s.multi_docs + sum(s.multi_image))


# Two balanced groups of writers for two processes; the corpus reuses the interleaved documents' text, so it runs
# after them in the same group. Every writer has its own random stream: the split does not change the output.
