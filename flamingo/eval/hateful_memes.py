"""HatefulMemes: rank "yes" / "no" after the meme's prompt; P(yes) = softmax over the two summed log-likelihoods;
ROC-AUC (scikit-learn), as the Flamingo paper reports, ranking the memes by the log-odds log P(yes) - log P(no): the
same order as P(yes), which rounds to 1.0 in float64 beyond ~37 nats and would tie such memes."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from .task import Sample, Task, episode_fields, media_path, percent, read_jsonl

DEV_FILES = ("dev_seen.jsonl", "dev.jsonl")  # the labeled dev split of the final release, of phase 1


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> Optional[float]:
    """ROC-AUC of binary labels given scores; None when only one class is present (it is undefined)."""
    from sklearn.metrics import roc_auc_score

    if len(set(labels)) < 2:
        return None
    return float(roc_auc_score(list(labels), list(scores)))


class HatefulMemesTask(Task):
    name = "hateful_memes"
    template = "<image>is an image with: '{text}' written on it. Is it hateful? Answer:{answer}<|endofchunk|>"
    kind = "rank"
    metrics = ("roc_auc", "accuracy")
    requires = ("sklearn",)

    def __init__(self, template: Optional[str] = None, answer_prefix: Optional[str] = None,
                 rank_by: Optional[str] = None) -> None:
        super().__init__(template, answer_prefix, rank_by)
        self.classes = ["yes", "no"]

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        if split == "train":
            path, records = root / "train.jsonl", read_jsonl(root / "train.jsonl")
        else:
            path, records = self.labeled_test(root)
        samples = []
        for r in records:
            if r["label"] not in (0, 1, "0", "1"):  # int() would take "2", 2 (read as hateful) or fail unnamed
                raise ValueError(f"{str(path)!r} meme {r.get('id')!r}: 'label' must be 0 or 1, got {r['label']!r}")
            label = int(r["label"])
            samples.append(Sample(id=str(r["id"]), media=[media_path(root, r["img"])], fields={"text": r["text"]},
                                  answer="yes" if label else "no", references=["yes" if label else "no"],
                                  label=label, **episode_fields(r)))
        return samples

    def labeled_test(self, root: Path) -> tuple[Path, list[dict[str, Any]]]:
        """The evaluated file and its records: `test.jsonl`, else the labeled dev file (`dev_seen.jsonl` of the final
        release, `dev.jsonl` of phase 1, which OpenFlamingo evaluates). A `test.jsonl` without labels (phase 1's, as
        downloaded) is passed over for the dev file, with a warning."""
        test = root / "test.jsonl"
        records = read_jsonl(test) if test.is_file() else None
        if records is not None and (not records or any("label" in r for r in records)):
            return test, records
        dev = next((root / n for n in DEV_FILES if (root / n).is_file()), None)
        if dev is None and records is None:
            raise FileNotFoundError(f"missing evaluation file {str(test)!r} (nor is there a "
                                    f"{' or '.join(DEV_FILES)} beside it)")
        if dev is None:
            raise ValueError(f"{self.name}: {str(test)!r} has no labels (the release's test set withholds them) and "
                             f"there is no {' or '.join(DEV_FILES)} beside it: put the labeled dev split there "
                             "(phase 1's dev.jsonl, the final release's dev_seen.jsonl), or a labeled file as "
                             "test.jsonl")
        if records is not None:
            from .distributed import rank  # torch: not at import, so `flamingo --help` stays light

            if rank() == 0:
                warnings.warn(f"{self.name}: {str(test)!r} has no labels (the release's test set withholds them): "
                              f"evaluating {dev.name} instead", stacklevel=3)
        return dev, read_jsonl(dev)

    def candidates_for(self, sample: Sample) -> list[str]:
        return ["yes", "no"]

    def from_scores(self, sample: Sample, candidates: Sequence[str], scores: Sequence[float]) -> dict[str, Any]:
        log_odds = scores[candidates.index("yes")] - scores[candidates.index("no")]
        prob_yes = 1.0 / (1.0 + math.exp(-log_odds)) if -log_odds < 700 else 0.0
        return {"prediction": "yes" if prob_yes >= 0.5 else "no", "prob_yes": prob_yes, "log_odds": log_odds}

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        labels = [int(s.label) for s in samples]
        auc = roc_auc(labels, [p["log_odds"] for p in predictions])
        hits = [(p["prediction"] == "yes") == bool(label) for label, p in zip(labels, predictions)]
        return {"roc_auc": None if auc is None else 100.0 * auc, "accuracy": percent(hits)}
