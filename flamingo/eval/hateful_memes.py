"""HatefulMemes: rank "yes" / "no" after the meme's prompt; P(yes) = softmax over the two summed log-likelihoods;
ROC-AUC (scikit-learn), as the Flamingo paper reports, ranking the memes by the log-odds log P(yes) - log P(no): the
same order as P(yes), which rounds to 1.0 in float64 beyond ~37 nats and would tie such memes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from .task import Sample, Task, episode_fields, media_path, percent, read_jsonl


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

    def __init__(self, template: Optional[str] = None, answer_prefix: Optional[str] = None) -> None:
        super().__init__(template, answer_prefix)
        self.classes = ["yes", "no"]

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        path = root / f"{split}.jsonl"
        if split == "test" and not path.is_file():
            path = root / "dev_seen.jsonl"
        samples = []
        for r in read_jsonl(path):
            label = int(r["label"])
            samples.append(Sample(id=str(r["id"]), media=[media_path(root, r["img"])], fields={"text": r["text"]},
                                  answer="yes" if label else "no", references=["yes" if label else "no"],
                                  label=label, **episode_fields(r)))
        return samples

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
