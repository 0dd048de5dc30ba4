"""The demo's last stage: few-shot prompts written by hand, answered as `flamingo generate` answers them.

The demo's model must answer "a few-shot prompt the user writes by hand". The prompts below are literal strings, as a
user would type them; their images are drawn fresh from the world's evaluation split (never a training image) with
the attributes each prompt names. Each prompt runs through the library's API exactly as `flamingo generate` runs it
(greedy, the text after the prompt without special tokens), and the report prints the shell command that reproduces
it.

The binding prompt names two objects with words no training text contains (checked against every text the LM and the
Flamingo stage read), and asks about the first kind again, so copying the most recent word gives the wrong answer.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from flamingo import Flamingo, FlamingoProcessor, load_pretrained
from flamingo.eval.vqa_metric import normalize_answer, postprocess_vqa_generation

from .common import words_of
from .files import save_image
from .world import World

CHUNK = "<|endofchunk|>"


def _vqa(question: str, answers: Sequence[str]) -> str:
    """`<image>Question:{q} Short answer:{a}<|endofchunk|>` per demo, then the query's open answer."""
    shot = f"<image>Question:{question} Short answer:"
    return "".join(f"{shot}{a}{CHUNK}" for a in answers) + shot


@dataclass(frozen=True)
class HandPrompt:
    name: str
    text: str  # one <image> per scene; binding prompts hold {a} and {b} for the two fresh words
    scenes: tuple[dict[str, Any], ...]  # World.sample_scene attributes of each image, in order; the last is the query
    expected: str  # the answer's first word ({a} / {b} in binding prompts)
    binding: bool = False
    image_references: bool = False  # declared images (`Image 0 is <image0>`), as `flamingo generate --image-references`


# Each query's answer is absent from its demos, so copying a demo's answer is wrong.
HAND_PROMPTS: tuple[HandPrompt, ...] = (
    HandPrompt("colour", _vqa("What colour is the object?", ["red", "blue"]),
               ({"kind": "circle", "colour": "red", "count": 1}, {"kind": "star", "colour": "blue", "count": 1},
                {"kind": "heart", "colour": "yellow", "count": 1}), "yellow"),
    HandPrompt("shape", _vqa("What shape is it?", ["triangle", "square"]),
               ({"kind": "triangle", "colour": "green", "count": 1}, {"kind": "square", "colour": "pink", "count": 1},
                {"kind": "ring", "colour": "purple", "count": 1}), "ring"),
    HandPrompt("count", _vqa("How many objects are there?", ["2", "1"]),
               ({"kind": "star", "colour": "orange", "count": 2}, {"kind": "circle", "colour": "cyan", "count": 1},
                {"kind": "square", "colour": "red", "count": 3}), "3"),
    HandPrompt("binding", f"<image>This is a {{a}}.{CHUNK}<image>This is a {{b}}.{CHUNK}" * 2 + "<image>This is a",
               ({"kind": "circle", "count": 1}, {"kind": "star", "count": 1}, {"kind": "circle", "count": 1},
                {"kind": "star", "count": 1}, {"kind": "circle", "count": 1}), "{a}", binding=True),
    # the query names its first image, not the last one its tokens would see without the reference
    HandPrompt("named-image", "Image 0 is <image0>. Image 1 is <image1>. Question:What colour is the object in "
               f"<image1>? Short answer:blue{CHUNK}Image 2 is <image2>. Image 3 is <image3>. Question:What colour is "
               "the object in <image2>? Short answer:",
               ({"kind": "circle", "colour": "red", "count": 1}, {"kind": "star", "colour": "blue", "count": 1},
                {"kind": "triangle", "colour": "green", "count": 1}, {"kind": "heart", "colour": "pink", "count": 1}),
               "green", image_references=True),
)
# Nonsense words for the binding prompt, in order of preference; the first two that no training text contains are used.
# Short ones first: a word of several BPE tokens is copied less reliably (docs/demo.md, "hand prompts").
HAND_WORDS = ("dax", "wug", "toma", "fep", "kiki", "bouba", "zorb", "blicket")


def fresh_hand_words(texts: Iterable[str], candidates: Sequence[str] = HAND_WORDS, n: int = 2) -> list[str]:
    """The first `n` candidates that occur as a word (`words_of`, as the LM's recall probes read words) in none of
    `texts` (files read as text)."""
    seen: set[str] = set()
    for path in texts:
        with open(path, encoding="utf-8") as f:
            for line in f:
                seen.update(words_of(line))
    fresh = [w for w in candidates if w not in seen]
    if len(fresh) < n:
        raise ValueError(f"every candidate word but {fresh} occurs in the training text; add fresh candidates")
    return fresh[:n]


def training_texts(world: dict[str, Any]) -> list[str]:
    """Every text file the demo's LM and Flamingo stage train on."""
    data, corpus = world["data"], world["corpus"]
    paths = [data[k]["path"] for k in ("interleaved", "pairs", "video", "prompted", "multi") if k in data]
    paths += [corpus[k] for k in ("train", "induction") if corpus.get(k)]
    return [p for p in paths if os.path.isfile(p)]


def answer_word(text: str) -> str:
    """A generated answer as the evaluation harness reads a VQA generation (cut at a line break, at ", " or at a new
    "Question" / "Answer" / "Short"; lower case; the official normalisation: `postprocess_vqa_generation`), so a hand
    prompt is judged as the VQA task judges: `" Ring."` -> `ring`, `"yes, it is"` -> `yes`, `"yellow star"` stays
    `yellow star`."""
    return normalize_answer(postprocess_vqa_generation(text))


@torch.no_grad()
def generate_text(model: Flamingo, processor: FlamingoProcessor, prompt: str, images: Sequence[str],
                  max_new_tokens: int, image_references: bool = False) -> str:
    """What `flamingo generate --prompt PROMPT --image ... --max-new-tokens N [--image-references]` prints: the greedy
    continuation after the prompt, decoded by the processor as the command does (control tokens left out, generated
    references `<imageK>` kept)."""
    batch = processor(prompt, images=list(images), image_references=image_references or None)
    inputs = {k: v for k, v in batch.items() if v is not None}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, num_return_sequences=1,
                         repetition_penalty=1.0)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:]).strip()


def run_hand_prompts(world: dict[str, Any], model_dir: str, out_dir: str, *, seed: int = 0,
                     max_new_tokens: int = 8) -> list[dict[str, Any]]:
    """Render each prompt's images, answer it as `flamingo generate` does, and write `out_dir/results.json`.

    Returns one record per prompt: its name, prompt, images, the shell command, the exit code `flamingo generate`
    gives it (2 for a prompt the processor refuses, with the error as output), the output, the expected and generated
    answer words, and whether they match."""
    model, processor = load_pretrained(model_dir)
    w = World(world["seed"], world["image_size"])
    rng = np.random.default_rng([seed, 31])
    a, b = fresh_hand_words(training_texts(world))
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for prompt in HAND_PROMPTS:
        text, expected = prompt.text, prompt.expected
        if prompt.binding:
            text, expected = text.format(a=a, b=b), expected.format(a=a, b=b)
        images = []
        for i, attributes in enumerate(prompt.scenes):
            scene = w.sample_scene(rng, "eval", **attributes)
            path = os.path.join(out_dir, f"{prompt.name}_{i}.png")
            save_image(w.render(scene), Path(path))
            images.append(path)
        argv = ["generate", "--model", model_dir, "--prompt", text, "--max-new-tokens", str(max_new_tokens)]
        for path in images:
            argv += ["--image", path]
        if prompt.image_references:
            argv.append("--image-references")
        try:
            output, code = generate_text(model, processor, text, images, max_new_tokens,
                                         image_references=prompt.image_references), 0
        except ValueError as e:  # a placeholder / image count mismatch: `flamingo generate` exits with code 2
            output, code = "", 2
            print(f"flamingo: error: {e}", file=sys.stderr)
        got = answer_word(output)
        records.append({"name": prompt.name, "prompt": text, "images": images,
                        "command": "flamingo " + " ".join(shlex.quote(x) for x in argv), "exit_code": code,
                        "output": output, "expected": expected, "answer": got, "correct": code == 0 and got == expected,
                        "binding": prompt.binding, "scenes": [dict(s) for s in prompt.scenes]})
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"words": [a, b], "results": records}, f, indent=1)
    return records
