"""MME (Fu et al., 2023): yes/no questions in pairs, two per image (one answered "yes", one "no"), in 10 perception
and 4 cognition subtasks. The model ranks " yes" / " no" after each question, as for HatefulMemes.

Scores as MME's own evaluation tool defines them, per subtask: accuracy (percent of questions right), accuracy+
(percent of images whose two questions are both right) and score = accuracy + accuracy+ (at most 200); the
perception and cognition totals are the sums of their subtasks' scores (at most 2000 and 800).

The data is MME's release as it unpacks: one folder per subtask, each image beside a `.txt` file of the same name, or
`images/` beside `questions_answers_YN/`; every line of a `.txt` is `question<TAB>Yes|No`. MME has no train split:
a query's demos (few-shot) are questions about other images of its own subtask, listed in the sample as an episode
(`demo_ids`), never its own image.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .task import Sample, Task, read_text

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# demo_ids listed per query: one per other image of its subtask, at most 32. MME's smallest subtasks (OCR,
# numerical_calculation, text_translation, code_reasoning: 20 images) list 19, so the full benchmark takes at most
# 19 shots; `evaluate` refuses more before the first query.
MAX_DEMOS = 32


def mme_scores(results: Sequence[tuple[str, str, bool]]) -> dict[str, float]:
    """(subtask, image, right) per question -> MME's metrics: `accuracy/S`, `accuracy_plus/S`, `score/S` per subtask
    S, `perception` and `cognition` (sums of their subtasks' scores, over the subtasks present; a subtask MME does not
    name counts in neither), `total` (their sum), and `accuracy` / `accuracy_plus` over every question and image.
    An image's accuracy+ needs all of its evaluated questions right (both, on the whole benchmark)."""
    by_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for subtask, image, right in results:
        by_image[(subtask, image)].append(bool(right))
    metrics: dict[str, float] = {}
    totals = {"perception": 0.0, "cognition": 0.0}
    for subtask in sorted({s for s, _ in by_image}):
        images = [answers for (s, _), answers in by_image.items() if s == subtask]
        questions = [a for answers in images for a in answers]
        accuracy = 100.0 * sum(questions) / len(questions)
        accuracy_plus = 100.0 * sum(all(answers) for answers in images) / len(images)
        metrics[f"accuracy/{subtask}"] = accuracy
        metrics[f"accuracy_plus/{subtask}"] = accuracy_plus
        metrics[f"score/{subtask}"] = accuracy + accuracy_plus
        if subtask in PERCEPTION:
            totals["perception"] += accuracy + accuracy_plus
        elif subtask in COGNITION:
            totals["cognition"] += accuracy + accuracy_plus
    every = [a for answers in by_image.values() for a in answers]
    head = {"total": totals["perception"] + totals["cognition"], **totals,
            "accuracy": 100.0 * sum(every) / max(len(every), 1),
            "accuracy_plus": 100.0 * sum(all(a) for a in by_image.values()) / max(len(by_image), 1)}
    return {**head, **metrics}


def _find_image(folder: Path, stem: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    raise FileNotFoundError(f"no image named {stem!r} in {str(folder)!r} for its MME questions")


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    """A subtask `.txt`: (question, "yes" | "no") per non-empty line (UTF-8, a leading byte-order mark dropped)."""
    text = read_text(path)
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        answer = parts[-1].strip().lower() if len(parts) >= 2 else ""
        if answer not in ("yes", "no"):
            raise ValueError(f"{str(path)!r} line {number}: expected 'question<TAB>Yes|No', got {line!r}")
        pairs.append(("\t".join(parts[:-1]).strip(), answer))
    return pairs


class MMETask(Task):
    name = "mme"
    template = "<image>Question:{question} Answer:{answer}<|endofchunk|>"
    answer_prefix = " "
    kind = "rank"
    metrics = ("total", "perception", "cognition", "accuracy", "accuracy_plus")

    def __init__(self, template: Optional[str] = None, answer_prefix: Optional[str] = None,
                 rank_by: Optional[str] = None) -> None:
        super().__init__(template, answer_prefix, rank_by)
        self.classes = ["yes", "no"]

    def load(self, data_dir: str, split: str) -> list[Sample]:
        """Every question of every subtask folder under `data_dir`; the "test" split lists each query's demos."""
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"MME data directory {str(root)!r} not found")
        samples: list[Sample] = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            qa = folder / "questions_answers_YN"
            texts, images = (qa, folder / "images") if qa.is_dir() else (folder, folder)
            for txt in sorted(texts.glob("*.txt")):
                image = str(_find_image(images, txt.stem))
                for i, (question, answer) in enumerate(_read_pairs(txt)):
                    samples.append(Sample(id=f"{folder.name}/{txt.stem}/{i}", media=[image],
                                          fields={"question": question}, answer=answer, references=[answer],
                                          label=answer, kind=folder.name))
        if not samples:
            raise ValueError(f"no MME questions under {str(root)!r}: expected one folder per subtask with "
                             "`question<TAB>Yes|No` .txt files beside their images (or in questions_answers_YN/)")
        if split == "test":
            self._list_demos(samples)
        return samples

    @staticmethod
    def _list_demos(samples: list[Sample]) -> None:
        """Each query's demos: one question about each other image of its subtask, in a seeded order, taking the
        images' first and second questions in turn (so yes and no answers alternate where the pairs are ordered)."""
        # subtask -> image -> its questions
        images: dict[str, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
        for s in samples:
            images[s.kind][s.media[0]].append(s)
        for s in samples:
            of_image = images[s.kind]
            others = [name for name in sorted(of_image) if name != s.media[0]]
            rng = np.random.default_rng(zlib.crc32(s.id.encode()))
            order = [others[i] for i in rng.permutation(len(others))][:MAX_DEMOS]
            s.demo_ids = [of_image[n][j % len(of_image[n])].id for j, n in enumerate(order)]

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return mme_scores([(s.kind, s.media[0], p["prediction"] == s.label) for s, p in zip(samples, predictions)])
