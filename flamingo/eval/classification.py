"""Image classification by ranking: every class name (or the sample's `candidates`) is scored as a continuation of
the prompt with `Flamingo.score`; top-1 / top-5 accuracy. ImageNet-style folders or JSONL splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .task import Sample, Task, episode_fields, media_path, read_json, read_jsonl

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def topk_accuracy(labels: Sequence[str], ranked: Sequence[Sequence[str]], k: int) -> float:
    """Fraction of samples whose label is among the first k of its ranked names."""
    if len(labels) != len(ranked):
        raise ValueError(f"{len(labels)} labels but {len(ranked)} rankings")
    if not labels:
        return 0.0
    return sum(label in list(r)[:k] for label, r in zip(labels, ranked)) / len(labels)


class ClassificationTask(Task):
    name = "classification"
    template = "<image>This is a{answer}.<|endofchunk|>"  # the mini world's (and Flamingo-style) sentence
    answer_prefix = " "
    kind = "rank"
    metrics = ("top1_accuracy", "top5_accuracy")

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        names = read_json(root / "classes.json") if (root / "classes.json").is_file() else None
        if (root / f"{split}.jsonl").is_file():
            records = read_jsonl(root / f"{split}.jsonl")
            self.classes = list(names) if names else sorted({str(r["label"]) for r in records} | set(self.classes))
            for r in records if split == "test" else []:  # a label no candidate names would be scored wrong, unseen
                choices = [str(c) for c in r.get("candidates") or self.classes]
                if str(r["label"]) not in choices:
                    raise ValueError(f"{split}.jsonl record {r['id']!r}: its label {str(r['label'])!r} is not among "
                                     f"its candidates ({'the record' if r.get('candidates') else 'classes.json'})")
            return [Sample(id=str(r["id"]), media=[media_path(root, r["image"])], fields={}, answer=str(r["label"]),
                           references=[str(r["label"])], label=str(r["label"]),
                           candidates=[str(c) for c in r["candidates"]] if r.get("candidates") else None,
                           **episode_fields(r)) for r in records]
        folder = root / ("train" if split == "train" else "val")
        if not folder.is_dir():
            raise FileNotFoundError(f"{str(root)!r} has neither {split}.jsonl nor an ImageNet-style {folder.name}/")
        folders = sorted(p for p in folder.iterdir() if p.is_dir())
        # classes.json: a {folder: name} map, or a list of names in sorted-folder order; else the folder names.
        if isinstance(names, dict):
            label_of = {p.name: str(names.get(p.name, p.name)) for p in folders}
        elif isinstance(names, list) and len(names) == len(folders):
            label_of = {p.name: str(n) for p, n in zip(folders, names)}
        else:
            label_of = {p.name: p.name for p in folders}
        self.classes = list(dict.fromkeys(label_of.values()))
        samples = []
        for p in folders:
            for image in sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS):
                label = label_of[p.name]
                samples.append(Sample(id=f"{p.name}/{image.name}", media=[str(image)], fields={}, answer=label,
                                      references=[label], label=label))
        return samples

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        labels = [s.label for s in samples]
        ranked = [p["top5"] for p in predictions]
        return {"top1_accuracy": 100.0 * topk_accuracy(labels, ranked, 1),
                "top5_accuracy": 100.0 * topk_accuracy(labels, ranked, 5)}
