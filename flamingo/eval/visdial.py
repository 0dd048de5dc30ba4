"""VisDial v1.0 (Das et al., 2017), as the Flamingo paper evaluates it: each dialog round ranks its 100 answer options
by log-likelihood after the image, the caption, the earlier rounds and the question. Metrics as VisDial's
evaluation (visdial-challenge-starter) computes them: the ground truth's rank among the options, R@1, R@5, R@10, MRR,
mean rank, over every round of every dialog, and NDCG (the paper's metric) over the rounds with dense relevance
annotations (one per dialog).

Files: `visdial_1.0_train.json` (or `train.json`: the demo pool), `visdial_1.0_val.json` (or `test.json`: evaluated;
v1.0's own test split withholds its answers), optional `visdial_1.0_val_dense_annotations.json` (or
`test_dense_annotations.json`); images anywhere under the directory, named with their COCO / VisDial image id at
the end of the file name (`COCO_train2014_000000123456.jpg`, `VisualDialog_val2018_000000123456.jpg`, `123456.png`).
The two numberings are independent (val2018's images are not COCO's), so an id found more than once is taken from
the file whose name (else folder) names the split: `COCO_` (or train2014/val2014) for train, `val2018` for val.
Every round is evaluated (20,640 on v1.0 val); without dense annotations NDCG is not reported. A demo is one round
of a training dialog with its history and its answer; one round per dialog (the round `dialog index % rounds`), so
the pool is a sample per dialog.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from .task import Sample, Task, list_field, percent, read_json

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_TRAILING_ID = re.compile(r"(\d+)$")
# what names an image of the split: train dialogs show COCO train2014 / val2014 images, val dialogs VisDial's own
_SPLIT_MARKS = {"train": ("COCO_", "train2014", "val2014"), "test": ("val2018",)}


def ndcg(relevance: Sequence[float], order: Sequence[int]) -> float:
    """VisDial's NDCG of one round: `order` lists the options best first; the gain of the first k, k = the options
    with non-zero relevance, over the best possible."""
    k = sum(1 for r in relevance if r != 0)

    def dcg(ranking: Sequence[int]) -> float:
        return sum(relevance[i] / math.log2(j + 2) for j, i in enumerate(ranking[:k]))

    best = dcg(sorted(range(len(relevance)), key=lambda i: -relevance[i]))
    return dcg(order) / best if best > 0 else 0.0


@functools.lru_cache(maxsize=4)
def _images_by_id(root: Path) -> dict[int, tuple[str, ...]]:
    """Every image under `root` by the id its file name ends with, all of an id's files in sorted order (walked once
    for both splits; `_image_of` picks a split's)."""
    found: dict[int, list[str]] = {}
    for path in sorted(root.rglob("*")):
        m = _TRAILING_ID.search(path.stem)
        if m is not None and path.suffix.lower() in _IMAGE_EXTS and path.is_file():
            found.setdefault(int(m.group(1)), []).append(str(path))
    return {i: tuple(paths) for i, paths in found.items()}


def _image_of(root: Path, paths: Sequence[str], split: str, image_id: int) -> str:
    """The image of `image_id` for `split` among the files ending with that id: the only one, else the first whose
    file name (else whose path under `root`) names the split (`_SPLIT_MARKS`)."""
    if len(paths) == 1:
        return paths[0]
    marks = _SPLIT_MARKS["train" if split == "train" else "test"]
    for part in (lambda p: Path(p).name, lambda p: str(Path(p).relative_to(root))):
        named = [p for p in paths if any(m in part(p) for m in marks)]
        if named:
            return named[0]
    shown = [str(Path(p).relative_to(root)) for p in paths[:3]]
    raise ValueError(f"VisDial image_id {image_id}: {len(paths)} images under {str(root)!r} end with it ({shown}) and "
                     f"none names the {split} split's ({' or '.join(marks)}): VisDial's val2018 ids are not COCO ids, "
                     "keep the downloads' file names")


def _index_into(index: Any, entries: Sequence[Any]) -> bool:
    """Whether `index` picks an entry of `entries`: an int (not a bool, JSON's true) from 0 to its length - 1 (a
    negative one would pick from the end)."""
    return isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(entries)


def _entry(path: Path, where: str, entries: Sequence[str], index: Any, name: str) -> str:
    """The file's question or answer a round names by its id, `index` (into the file's `questions` or `answers`)."""
    if not _index_into(index, entries):
        raise ValueError(f"{str(path)!r} {where}: {name} id {index!r} is not an index into the file's "
                         f"{len(entries)} {'questions' if name == 'question' else 'answers'}")
    return entries[index]


def _first(root: Path, *names: str) -> Optional[Path]:
    return next((root / n for n in names if (root / n).is_file()), None)


class VisDialTask(Task):
    name = "visdial"
    template = "<image>Caption: {caption}. {history}Question: {question}? Answer:{answer}<|endofchunk|>"
    answer_prefix = " "
    kind = "rank"
    metrics = ("ndcg", "r@1", "r@5", "r@10", "mrr", "mean_rank")

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        names = (f"visdial_1.0_{split}.json", f"{split}.json") if split == "train" else \
            ("visdial_1.0_val.json", "test.json")
        path = _first(root, *names)
        if path is None:
            raise FileNotFoundError(f"{str(root)!r} has none of {list(names)} (VisDial v1.0's dialogs)")
        data = read_json(path)["data"]
        questions, answers = data["questions"], data["answers"]
        dense: dict[int, tuple[int, list[float]]] = {}
        dense_path = None if split == "train" else _first(root, "visdial_1.0_val_dense_annotations.json",
                                                           "test_dense_annotations.json")
        if dense_path is not None:
            for entry in read_json(dense_path):  # round_id counts from 1, as VisDial's evaluation reads it
                relevance = list_field(dense_path, f"image_id {entry.get('image_id')!r}", entry["gt_relevance"],
                                       "gt_relevance", "a list of numbers", (int, float))
                dense[int(entry["image_id"])] = (int(entry["round_id"]) - 1, [float(r) for r in relevance])
        images = _images_by_id(root)
        samples = []
        for d, dialog in enumerate(data["dialogs"]):
            image_id = int(dialog["image_id"])
            if image_id not in images:
                raise FileNotFoundError(f"no image for VisDial image_id {image_id} under {str(root)!r}")
            image = _image_of(root, images[image_id], split, image_id)
            rounds = dialog["dialog"]
            if image_id in dense and not 0 <= (r := dense[image_id][0]) < len(rounds):  # -1: a round_id of 0
                raise ValueError(f"{str(dense_path)!r}: image_id {image_id} has round_id {r + 1}, but its dialog "
                                 f"has rounds 1-{len(rounds)} (round_id counts from 1)")
            # VisDial's evaluation ranks every round (R@k, MRR, mean rank) and scores NDCG on the dense one
            # a dialog without rounds has none to show or rank
            chosen = ([d % len(rounds)] if rounds else []) if split == "train" else range(len(rounds))
            where = [f"image_id {image_id} round {r + 1}" for r in range(len(rounds))]
            for r, t in enumerate(rounds):
                if "answer" not in t:  # VisDial's test file: its last round has none
                    raise ValueError(f"{str(path)!r} {where[r]} has no 'answer': an unlabeled split cannot be scored")
            asked = [(_entry(path, where[r], questions, t.get("question"), "question"),
                      _entry(path, where[r], answers, t["answer"], "answer")) for r, t in enumerate(rounds)]
            for r in chosen:
                turn = rounds[r]
                history = "".join(f"Question: {q}? Answer: {a}. " for q, a in asked[:r])
                answer = asked[r][1]
                options = [_entry(path, where[r], answers, i, "answer option")
                           for i in list_field(path, where[r], turn.get("answer_options", []), "answer_options",
                                               "a list of answer ids")]
                gt_index = turn.get("gt_index", options.index(answer) if answer in options else None)
                # ranked, one outside its options would fail as "not in list"; a round without options ranks
                # nothing (an evaluated one is refused as such, a trimmed train file's demos need none)
                if options and gt_index is not None and not _index_into(gt_index, options):
                    raise ValueError(f"{str(path)!r} {where[r]}: gt_index {gt_index!r} outside its {len(options)} "
                                     "answer options (it counts from 0)")
                relevance = dense[image_id][1] if image_id in dense and dense[image_id][0] == r else None
                if relevance is not None and len(relevance) != len(options):
                    raise ValueError(f"{str(dense_path)!r}: image_id {image_id} has {len(relevance)} gt_relevance "
                                     f"scores, but its round {r + 1} has {len(options)} answer options")
                samples.append(Sample(
                    id=f"{image_id}_{r + 1}", media=[image],
                    fields={"caption": dialog["caption"], "history": history, "question": questions[turn["question"]]},
                    answer=answer, references=[answer], candidates=options if split != "train" else None,
                    label={"gt_index": gt_index, "relevance": relevance}))
        return samples

    def from_scores(self, sample: Sample, candidates: Sequence[str], scores: Sequence[float]) -> dict[str, Any]:
        order = sorted(range(len(candidates)), key=lambda i: -scores[i])  # stable: ties keep the options' order
        record: dict[str, Any] = {"prediction": candidates[order[0]], "top5": [candidates[i] for i in order[:5]]}
        gt, relevance = sample.label["gt_index"], sample.label["relevance"]
        if gt is not None:
            record["rank"] = order.index(gt) + 1
        if relevance is not None:
            if len(relevance) != len(candidates):
                raise ValueError(f"VisDial round {sample.id}: {len(relevance)} relevance scores for "
                                 f"{len(candidates)} options")
            record["ndcg"] = ndcg(relevance, order)
        return record

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ranks = [p["rank"] for p in predictions if "rank" in p]
        gains = [p["ndcg"] for p in predictions if "ndcg" in p]
        metrics: dict[str, Any] = {"ndcg": percent(gains) if gains else None}
        for k in (1, 5, 10):
            metrics[f"r@{k}"] = percent([r <= k for r in ranks]) if ranks else None
        metrics["mrr"] = percent([1 / r for r in ranks]) if ranks else None
        metrics["mean_rank"] = sum(ranks) / len(ranks) if ranks else None
        return metrics
