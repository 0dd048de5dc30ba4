"""The texts of the mini world: documents, questions, prompts, the LM corpus and its induction documents."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np

from .world import KINDS, Clip, Scene, Split, World

PathLike = Union[str, os.PathLike]

OPENERS = ("Some shapes from my notebook.", "Look at these pictures.", "Here is a page of drawings.",
           "I drew a few shapes today.", "A short photo story.")
CLOSERS = ("That is all for today.", "Thanks for looking.", "More shapes tomorrow.", "The end.")
COMMENTS = ("I like this one.", "It was easy to draw.", "Nice colour.", "This one took a while.")
MAX_BINDING_WAYS = 3  # an evaluation binding episode binds 2 or 3 words
BINDING_OPENERS = ("Some new words.", "Let me teach you two words.", "Learn these names.")


def pick(options: Sequence[Any], rng: np.random.Generator) -> Any:
    return options[int(rng.integers(len(options)))]


# ------------------------------------------------------------------------------------------------- documents
def story_document(world: World, rng: np.random.Generator) -> tuple[list[str], list[Scene], list[int]]:
    """A scene story: 2-5 training images, each matched to a sentence; some sentences refer to the previous or next
    image ("the next one is also red", "unlike the previous one, this is a square"), some have no image."""
    n = int(rng.integers(2, 6))
    scenes: list[Scene] = []
    for _ in range(n):
        prev = scenes[-1] if scenes else None
        r = rng.random()
        if prev is not None and r < 0.35:  # same colour, other kind when the pair is allowed
            kind = pick([k for k in KINDS if k != prev.kind and world.allowed(k, prev.colour, "train")], rng)
            scenes.append(world.sample_scene(rng, "train", kind=kind, colour=prev.colour))
        elif prev is not None and r < 0.55:  # same kind
            scenes.append(world.sample_scene(rng, "train", kind=prev.kind))
        else:
            scenes.append(world.sample_scene(rng, "train"))
    texts: list[str] = []
    matched: list[int] = []
    if rng.random() < 0.6:
        texts.append(pick(OPENERS, rng))
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
            texts.append(pick(COMMENTS, rng))
    if rng.random() < 0.4:
        texts.append(pick(CLOSERS, rng))
    return texts, scenes, matched


def question_text(world: World, scene: Scene, rng: np.random.Generator) -> str:
    """A random question about a still and its short answer, in the VQA prompt of flamingo/eval/vqa.py."""
    _, question, answer = pick(world.questions(scene), rng)
    return f"Question:{question} Short answer:{answer}"


def clip_question_text(world: World, clip: Clip, rng: np.random.Generator) -> str:
    """A random question about a clip and its answer, in the video QA prompt of flamingo/eval/videoqa.py."""
    _, question, answer = pick(world.clip_questions(clip), rng)
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
        texts.append(pick(OPENERS, rng))
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
        texts.append(pick(BINDING_OPENERS, rng))
    scenes, matched = [], []
    for k in sequence:
        scenes.append(world.sample_scene(rng, split, kind=kinds[k], count=1))
        matched.append(len(texts))
        texts.append(f"This is a {words[k]}." if rng.random() < 0.8 else f"Here is a {words[k]}.")
    return texts, scenes, matched, words


MULTI_IMAGE_TYPES = ("colour", "shape", "same_shape", "same_colour")


def multi_image_question(world: World, rng: np.random.Generator, split: Split
                         ) -> tuple[list[Scene], str, str, str]:
    """2-3 single-object images and a question that names one or two of them by reference (MMICL-style, the prompt
    declares them: flamingo/eval/multi_image.py): "What colour is the object in <image1>?", "What shape is the object
    in <image0>?", "Are <image0> and <image2> the same shape?" (yes half of the time). Returns (scenes, question type,
    question, answer). The images differ in kind and colour (but for a "yes" pair in the attribute asked), so a
    question answered from another image than the named one is wrong."""
    n = 2 if rng.random() < 0.5 else 3
    r = rng.random()
    qtype = MULTI_IMAGE_TYPES[min(int(r * len(MULTI_IMAGE_TYPES)), len(MULTI_IMAGE_TYPES) - 1)]  # a quarter each
    i, j = sorted(int(x) for x in rng.choice(n, 2, replace=False))
    same = qtype.startswith("same") and rng.random() < 0.5
    scenes: list[Scene] = []
    for k in range(n):
        while True:
            if same and k == j:  # the attribute asked copied from image i
                fixed = {"kind": scenes[i].kind} if qtype == "same_shape" else {"colour": scenes[i].colour}
                scene = _scene_with(world, rng, split, **fixed)
            else:
                scene = world.sample_scene(rng, split, count=1)
            twin = same and k == j
            others = [o for m, o in enumerate(scenes) if not (twin and m == i)]
            if all(scene.kind != o.kind and scene.colour != o.colour for o in others) and not (
                    twin and (scene.kind, scene.colour) == (scenes[i].kind, scenes[i].colour)):
                break
        scenes.append(scene)
    k = int(rng.integers(n))
    if qtype == "colour":
        return scenes, qtype, f"What colour is the object in <image{k}>?", scenes[k].colour
    if qtype == "shape":
        return scenes, qtype, f"What shape is the object in <image{k}>?", scenes[k].kind
    attr = "shape" if qtype == "same_shape" else "colour"
    return scenes, qtype, f"Are <image{i}> and <image{j}> the same {attr}?", "yes" if same else "no"


def _scene_with(world: World, rng: np.random.Generator, split: Split, kind: Optional[str] = None,
                colour: Optional[str] = None) -> Scene:
    """A one-object scene of this kind or colour, the other attribute drawn among those `split` allows."""
    while True:
        k = kind if kind is not None else KINDS[int(rng.integers(len(KINDS)))]
        if colour is None:
            return world.sample_scene(rng, split, kind=k, count=1)
        if world.allowed(k, colour, split):
            return world.sample_scene(rng, split, kind=k, colour=colour, count=1)


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
            text = " ".join(f"This is a {pick(KINDS, rng)}." for _ in range(m))
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
