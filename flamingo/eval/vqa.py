"""VQA (VQAv2's layout; VizWiz and TextVQA in it): generate a short answer, score with the official VQA accuracy.

A demo shows the answer `demo_answer` picks (`flamingo eval --demo-answer`): "consensus" (the default), its
annotation's `multiple_choice_answer` (VQAv2's and OK-VQA's consensus answer; else its first human answer), or
"first", its first human answer (`answers[0]`), as OpenFlamingo's evaluate.py writes its VQA demos. The two are the
same on VizWiz and TextVQA (no `multiple_choice_answer`); on VQAv2 and OK-VQA "consensus" shows the answer most
annotators gave rather than an arbitrary one of the ten, and "first" reproduces OpenFlamingo's prompts.

OK-VQA's annotations read in this layout too, but are not scored as OK-VQA's evaluation scores them: its answers are
stemmed ("riding" -> "ride", `raw_answer` holds the unstemmed one) and its evaluation stems the prediction with
OpenFlamingo's OKVQAStemmer (NLTK's WordNet and tagger data, which are not shipped), so a natural "riding" scores 0
here and accuracy is below the official metric. A set whose answers carry `raw_answer` gets a warning saying so.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from .task import Sample, Task, episode_fields, has_text, media_path, per_kind, percent, read_json
from .vqa_metric import postprocess_vqa_generation, vqa_accuracy

DEMO_ANSWERS = ("consensus", "first")  # what a demo shows: `multiple_choice_answer`, or `answers[0]` (OpenFlamingo)
COCO_NAME = re.compile(r"_(\d+)\.jpg$")  # COCO_val2014_000000123456.jpg: the image id, zero-padded to 12 digits


class ImageFinder:
    """The image file of a question's `image_id` under `DIR/images`, listed once (a directory of 40k-120k COCO images
    would otherwise be listed once per question): the id itself when it names a file (VizWiz's
    `VizWiz_val_00000000.jpg`), else `{image_id}.jpg|png|jpeg` (TextVQA's), else COCO's `*_{image_id:012d}.jpg`
    (VQAv2's). None of them: the `.jpg` path, skipped and counted as missing when a query needs it (`media_path`)."""

    def __init__(self, images: Path) -> None:
        self.images = images
        # sorted: the first of several COCO names of one id is the same on every file system
        names = sorted(e.name for e in os.scandir(images) if e.is_file()) if images.is_dir() else []
        self.files = set(names)
        self.coco: dict[str, str] = {}  # the id's digits (12 for COCO) -> the first file name ending in them
        for name in names:
            if m := COCO_NAME.search(name):
                self.coco.setdefault(m.group(1), name)

    def __call__(self, image_id: Any) -> str:
        for name in (str(image_id), *(f"{image_id}{ext}" for ext in (".jpg", ".png", ".jpeg"))):
            if name in self.files or ("/" in name and (self.images / name).is_file()):  # an id naming a subfolder
                return str(self.images / name)
        if str(image_id).isdigit() and (name := self.coco.get(f"{int(image_id):012d}")) is not None:
            return str(self.images / name)
        return str(self.images / f"{image_id}.jpg")


class VQATask(Task):
    name = "vqa"
    template = "<image>Question:{question} Short answer:{answer}<|endofchunk|>"
    metrics = ("vqa_accuracy",)
    max_new_tokens = 5
    num_beams = 3  # OpenFlamingo's VQA setting
    demo_separator = "\n"  # after each demo, as OpenFlamingo's evaluate.py writes its VQA prompts
    demo_answer = "consensus"  # one of DEMO_ANSWERS (the module's docstring)
    warned_stemmed = False  # the OK-VQA warning is given once per task

    def __init__(self, template: Optional[str] = None, answer_prefix: Optional[str] = None,
                 rank_by: Optional[str] = None, demo_answer: Optional[str] = None) -> None:
        super().__init__(template, answer_prefix, rank_by)
        self.demo_answer = type(self).demo_answer if demo_answer is None else demo_answer
        if self.demo_answer not in DEMO_ANSWERS:
            raise ValueError(f"demo_answer must be one of {DEMO_ANSWERS}, got {self.demo_answer!r}")

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        questions = read_json(root / f"{split}_questions.json")["questions"]
        annotations_path = root / f"{split}_annotations.json"
        annotations = {a["question_id"]: a for a in read_json(annotations_path)["annotations"]}
        samples, stemmed = [], False
        find_image = ImageFinder(root / "images")
        for q in questions:
            ann = annotations.get(q["question_id"])
            if ann is None:
                raise ValueError(f"{split}: question {q['question_id']} has no annotation")
            # strings, as the metric and the prompts read them (a converted set may write "how many" answers as 2)
            answers = [str(a["answer"]) for a in ann.get("answers", [])]
            stemmed = stemmed or any("raw_answer" in a for a in ann.get("answers", []))
            chosen = ann.get("multiple_choice_answer")
            if not answers and not has_text(chosen):  # scored against "", "" or "the" would score 100%
                raise ValueError(f"{str(annotations_path)!r}: question {q['question_id']!r} has no answer (neither "
                                 "'answers' nor 'multiple_choice_answer'): an unlabeled split cannot be scored")
            first = answers[0] if answers else str(chosen)
            consensus = str(chosen) if has_text(chosen) else first
            answer = first if self.demo_answer == "first" and answers else consensus
            image = media_path(root, q["image"]) if q.get("image") else find_image(q["image_id"])
            # VQAv2's answer_type (yes/no, number, other); else a dataset's own question_type (OK-VQA's categories)
            kind = ann.get("answer_type") or ann.get("question_type")
            samples.append(Sample(id=str(q["question_id"]), media=[image], fields={"question": q["question"]},
                                  answer=answer, references=answers or [answer], **episode_fields(q),
                                  kind=str(kind) if kind is not None else None))
        from .distributed import rank  # torch: not at import, so `flamingo --help` stays light

        if stemmed and not self.warned_stemmed and rank() == 0:
            self.warned_stemmed = True
            warnings.warn(f"{split} annotations of {data_dir!r} carry `raw_answer` (OK-VQA's stemmed answers): "
                          "predictions are not stemmed as OK-VQA's evaluation stems them (its stemmer needs NLTK "
                          "data not shipped here), so a prediction like 'riding' for 'ride' scores 0 and accuracy "
                          "is below the official OK-VQA metric", stacklevel=2)
        return samples

    def postprocess(self, text: str) -> str:
        return postprocess_vqa_generation(text)

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        scores = [vqa_accuracy(p["prediction"], s.references) for s, p in zip(samples, predictions)]
        # with the official evaluation's per-answer-type breakdown
        return {"vqa_accuracy": percent(scores), **per_kind("vqa_accuracy", samples, scores)}
