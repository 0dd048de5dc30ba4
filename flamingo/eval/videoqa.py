"""Video QA (MSRVTT-QA / MSVD-QA / iVQA layout): generate a short answer, scored after VQA normalisation: exact match
with `answer`, or, for a record with several human `answers` (iVQA's five), iVQA's accuracy min(1, matches / 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .task import Sample, Task, episode_fields, media_path, percent, read_json
from .vqa_metric import normalize_answer, postprocess_vqa_generation


class VideoQATask(Task):
    name = "videoqa"
    template = "<image>Question:{question} Answer:{answer}<|endofchunk|>"
    metrics = ("accuracy",)
    requires = ("av",)
    max_new_tokens = 5
    num_beams = 3

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        samples = []
        for rec in read_json(root / f"{split}_qa.json"):
            video = rec.get("video") or f"videos/{rec['video_id']}.mp4"
            answers = [str(a) for a in rec.get("answers") or [rec["answer"]]]
            answer = str(rec["answer"]) if "answer" in rec else max(answers, key=answers.count)  # the most given
            samples.append(Sample(id=str(rec["id"]), media=[media_path(root, video)],
                                  fields={"question": rec["question"]}, answer=answer, references=answers,
                                  **episode_fields(rec)))
        return samples

    def postprocess(self, text: str) -> str:
        return postprocess_vqa_generation(text)

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"accuracy": percent([answer_score(p["prediction"], s.references)
                                     for s, p in zip(samples, predictions)])}


def answer_score(prediction: str, answers: Sequence[str]) -> float:
    """One answer: exact match after normalisation; several (iVQA): min(1, the answers it matches / 2)."""
    prediction = normalize_answer(prediction)
    matches = sum(prediction == normalize_answer(a) for a in answers)
    return float(matches > 0) if len(answers) == 1 else min(1.0, matches / 2)
