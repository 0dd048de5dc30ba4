"""Multiple-choice video QA (STAR, NExT-QA's multiple-choice form, TVQA-style sets): rank the question's options by
log-likelihood after the clip and the question; accuracy, and accuracy per question type when records name one.

Files: `{train,test}.jsonl`, one question per line: `{"id", "video", "question", "options": [...], "answer": the
right option's index or text, "type"?}`; videos relative to the directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .task import Sample, Task, episode_fields, list_field, media_path, per_kind, percent, read_jsonl


class VideoQAChoiceTask(Task):
    name = "videoqa_mc"
    template = "<image>Question:{question} Answer:{answer}<|endofchunk|>"
    answer_prefix = " "
    kind = "rank"
    metrics = ("accuracy",)
    requires = ("av",)

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        samples = []
        path = root / f"{split}.jsonl"
        for rec in read_jsonl(path):
            options = [str(o) for o in list_field(path, f"question {rec.get('id')!r}", rec["options"], "options",
                                                  "a list")]
            answer = rec["answer"]
            if isinstance(answer, int) and not isinstance(answer, bool):
                if not 0 <= answer < len(options):
                    raise ValueError(f"question {rec['id']!r}: answer index {answer} outside its "
                                     f"{len(options)} options")
                answer = options[answer]
            elif str(answer) not in options:
                raise ValueError(f"question {rec['id']!r}: its answer {answer!r} is not one of its options")
            samples.append(Sample(id=str(rec["id"]), media=[media_path(root, rec["video"])],
                                  fields={"question": rec["question"]}, answer=str(answer), references=[str(answer)],
                                  candidates=options, kind=rec.get("type"), **episode_fields(rec)))
        return samples

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        hits = [p["prediction"] == s.answer for s, p in zip(samples, predictions)]
        return {"accuracy": percent(hits), **per_kind("accuracy", samples, hits)}
