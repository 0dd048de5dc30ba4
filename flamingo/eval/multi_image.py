"""Multi-image questions (MMICL-style): 2-3 images per query, declared in the prompt (`Image 0 is <image0>`), and a
question that names one of them by reference ("what colour is the shape in <image0>?", "are <image0> and <image2> the
same shape?"); a short answer, exact match after VQA normalisation.

Records (`{train,test}.jsonl`): `{"id", "images": [paths], "question", "answer"}` (+ optional `"type"`, reported per
type), where the question writes `<imagek>` for the sample's k-th image. In a few-shot prompt every sample declares
its own images, numbered on through the prompt (a demo of 3 images takes 0-2, the next one's start at 3): the model's
masking rule reads a reference as the prompt's k-th image. The model needs reference tokens for every image of the
longest prompt (`FlamingoConfig.num_image_references`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from ..config import MEDIA_TOKEN
from ..references import DECLARATION, REFERENCE, reference_token
from .task import Sample, Task, episode_fields, has_text, list_field, media_path, per_kind, percent, read_jsonl
from .vqa_metric import normalize_answer, postprocess_vqa_generation

NUMBERED = re.compile(f"{DECLARATION.pattern}|{REFERENCE.pattern}")  # a declaration, or a reference


def declarations(n: int) -> str:
    """`Image 0 is <image0>. Image 1 is <image1>. ` for n images."""
    return "".join(f"Image {k} is {reference_token(k)}. " for k in range(n))


def in_words(text: str) -> str:
    """Every reference of `text` written as words (`<image0>` -> `image 0`); declarations stay."""
    return NUMBERED.sub(lambda m: m.group(0) if m.group(4) is None else f"image {m.group(4)}", text)


def renumber(text: str, offset: int) -> str:
    """Every image number of `text` (declarations and references) shifted by `offset`."""
    def shift(m: re.Match) -> str:
        if m.group(4) is not None:  # a reference
            return reference_token(int(m.group(4)) + offset)
        return f"Image {int(m.group(1)) + offset} is {reference_token(int(m.group(3)) + offset)}"

    return NUMBERED.sub(shift, text)


class MultiImageTask(Task):
    name = "multi_image"
    # `<image>` stands for the sample's declared images (`declarations`)
    template = "<image>Question:{question} Short answer:{answer}<|endofchunk|>"
    metrics = ("accuracy",)
    max_new_tokens = 5
    num_beams = 3
    image_references = True

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        samples = []
        path = root / f"{split}.jsonl"
        for rec in read_jsonl(path):
            images = [media_path(root, p) for p in list_field(path, f"record {rec.get('id')!r}", rec["images"],
                                                              "images", "a list of paths")]
            question = str(rec["question"])
            bad = [int(k) for k in REFERENCE.findall(question) if int(k) >= len(images)]
            if bad:
                raise ValueError(f"{self.name} record {rec['id']!r}: the question refers to image {bad[0]} but the "
                                 f"record has {len(images)} image(s)")
            answer = rec.get("answer")
            if not has_text(answer):  # scored against "None" or "", as VQA refuses it
                raise ValueError(f"{str(path)!r}: record {rec.get('id')!r} has no answer: an unlabeled split cannot "
                                 "be scored")
            samples.append(Sample(id=str(rec["id"]), media=images, fields={"question": question},
                                  answer=str(answer), references=[str(answer)], kind=rec.get("type"),
                                  **episode_fields(rec)))
        return samples

    def demo_prompt(self, sample: Sample, with_media: bool = True) -> str:
        """A solved example declaring its images; without media (the zero-shot convention's text-only demos) its
        references read `image k`."""
        text = self.template.format(**sample.fields, answer=self.answer_prefix + sample.answer)
        if with_media:
            return text.replace(MEDIA_TOKEN, declarations(len(sample.media)), 1)
        return in_words(text.replace(MEDIA_TOKEN, ""))

    def query_prompt(self, sample: Sample) -> str:
        text = self.template[: self.template.index("{answer}")].format(**sample.fields)
        return text.replace(MEDIA_TOKEN, declarations(len(sample.media)), 1)

    def join_prompt(self, parts: Sequence[str]) -> str:
        """Each part numbers its images from 0; in the prompt they number on from the images before it. Then the
        images are named after their declarations as `name_images` says."""
        out, offset = [], 0
        for part in parts:
            out.append(renumber(part, offset))
            offset += len(DECLARATION.findall(part))
        return self.name_images("".join(out))

    def name_images(self, prompt: str) -> str:
        """How the prompt names a declared image: by reference (`<image0>`)."""
        return prompt

    def postprocess(self, text: str) -> str:
        return postprocess_vqa_generation(text)

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        hits = [normalize_answer(p["prediction"]) == normalize_answer(s.answer) for s, p in zip(samples, predictions)]
        return {"accuracy": percent(hits), **per_kind("accuracy", samples, hits)}


class MultiImagePlainTask(MultiImageTask):
    """The same questions with the images named in words (`image 0`), not by reference: the images are declared, but
    the question's tokens see the last image only, as in any Flamingo prompt (the baseline references improve on)."""

    name = "multi_image_plain"

    def name_images(self, prompt: str) -> str:
        """References in words (`image 3`, numbered through the prompt); the declarations stay."""
        return in_words(prompt)
