"""Video QA (MSRVTT-QA / MSVD-QA / iVQA layout): generate a short answer, exact match after VQA normalisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .task import Sample, Task, episode_fields, media_path, percent, read_json
from .vqa_metric import normalize_answer, postprocess_vqa_generation


class VideoQATask(Task):
    name = "videoqa"
    template = "<image>Question:{question} Answer:{answer}<|endofchunk|>"
    metrics = ("accuracy",)
    max_new_tokens = 5
    num_beams = 3

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        samples = []
        for rec in read_json(root / f"{split}_qa.json"):
            video = rec.get("video") or f"videos/{rec['video_id']}.mp4"
            samples.append(Sample(id=str(rec["id"]), media=[media_path(root, video)],
                                  fields={"question": rec["question"]}, answer=str(rec["answer"]),
                                  references=[str(rec["answer"])], **episode_fields(rec)))
        return samples

    def postprocess(self, text: str) -> str:
        return postprocess_vqa_generation(text)

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        hits = [normalize_answer(p["prediction"]) == normalize_answer(s.answer) for s, p in zip(samples, predictions)]
        return {"accuracy": percent(hits)}
