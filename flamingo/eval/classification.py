"""Image classification by ranking: every class name (or the sample's `candidates`) is scored as a continuation of
the prompt with `Flamingo.score`; top-1 / top-5 accuracy. ImageNet-style folders or JSONL splits.

ImageNet-style folders: a class is a folder of `train/` or `val/`; the candidates of every query are the classes of
both (their union), named by classes.json (`folder_labels`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from .task import Sample, Task, episode_fields, list_field, media_path, read_json, read_jsonl

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
        names = read_classes(root / "classes.json")
        if (root / f"{split}.jsonl").is_file():
            records = read_jsonl(root / f"{split}.jsonl")
            for r in records:
                if r.get("candidates") is not None:
                    list_field(root / f"{split}.jsonl", f"record {r.get('id')!r}", r["candidates"], "candidates",
                               "a list of class names")
            # the class names (a {folder: name} map's names: the JSONL layout's labels are names, not folders)
            named = list(dict.fromkeys(names.values())) if isinstance(names, dict) else list(names or [])
            self.classes = named or sorted({str(r["label"]) for r in records} | set(self.classes))
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
        label_of = folder_labels(root, names)
        self.classes = list(dict.fromkeys(label_of.values()))  # every class of the dataset, whichever split this is
        folders = sorted(p for p in folder.iterdir() if p.is_dir())
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


def read_classes(path: Path) -> Optional[list[str] | dict[str, str]]:
    """classes.json (None where there is none): a list of class names or a {folder: name} map, its names strings (a
    number or a list would reach the prompts as no class name), else a ValueError naming the file; a string would
    name a class per character."""
    if not path.is_file():
        return None
    names = read_json(path)
    if isinstance(names, dict):
        bad = next(((folder, name) for folder, name in names.items() if not isinstance(name, str)), None)
        if bad is not None:
            raise ValueError(f"{str(path)!r}: a {{folder: name}} map's names must be strings, got {bad[0]!r}: "
                             f"{bad[1]!r:.80}")
        return names
    if not isinstance(names, list):
        raise ValueError(f"{str(path)!r} must be a list of class names or a {{folder: name}} map, got "
                         f"{type(names).__name__}")
    return list_field(path, "(one name per class)", names, "classes", "a list of strings", items=(str,))


def folder_labels(root: Path, names: Any) -> dict[str, str]:
    """ImageNet-style folders: class folder -> label, over the union of the class folders of `train/` and `val/`
    (sorted), so that a split holding only some classes (a val subset) labels them as the other split does.

    `names` (classes.json): a {folder: name} map naming every folder, or a list of one name per folder of the union
    in sorted order; None: the folder names. A list of another length or a map lacking a folder is refused: labels
    mixing names and folder names (WordNet ids) would be scored without an error.
    """
    union = sorted({p.name for split in ("train", "val") if (root / split).is_dir()
                    for p in (root / split).iterdir() if p.is_dir()})
    where = str(root / "classes.json")
    if names is None:
        return {f: f for f in union}
    if isinstance(names, dict):
        missing = [f for f in union if f not in names]
        if missing:
            raise ValueError(f"{where!r} names no class for the folders {missing[:5]} ({len(missing)} of the "
                             f"{len(union)} class folders of train/ and val/)")
        return {f: str(names[f]) for f in union}
    if isinstance(names, list):
        if len(names) != len(union):
            raise ValueError(f"{where!r} lists {len(names)} names, but train/ and val/ hold {len(union)} class folders "
                             "(their union): a list names them in sorted order, one each; or write a {folder: name} "
                             "map")
        return {f: str(n) for f, n in zip(union, names)}
    raise ValueError(f"{where!r} must be a list of class names or a {{folder: name}} map, got {type(names).__name__}")
