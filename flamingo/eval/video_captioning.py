"""Video captioning (MSVD / MSR-VTT / VATEX style): beam-search a caption of a video, score with CIDEr."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .cider import cider
from .task import Sample, Task, demo_ids_of, media_path, read_json


class VideoCaptioningTask(Task):
    name = "video_captioning"
    template = "<image>Output:{answer}<|endofchunk|>"
    metrics = ("cider",)
    max_new_tokens = 20
    num_beams = 3

    def __init__(self, template: str | None = None, answer_prefix: str | None = None,
                 tokenizer: str = "auto") -> None:
        super().__init__(template, answer_prefix)
        self.tokenizer = tokenizer

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        samples = []
        for rec in read_json(root / f"{split}.json"):
            captions = list(rec.get("captions") or [])
            if not captions:
                raise ValueError(f"{split}.json: video {rec.get('id')!r} has no captions")
            samples.append(Sample(id=str(rec["id"]), media=[media_path(root, rec["video"])], fields={},
                                  answer=captions[0].strip(), references=captions, demo_ids=demo_ids_of(rec)))
        return samples

    def postprocess(self, text: str) -> str:
        return text.split("Output")[0].split("\n")[0].strip()

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        score, used = cider({s.id: p["prediction"] for s, p in zip(samples, predictions)},
                            {s.id: s.references for s in samples}, self.tokenizer)
        return {"cider": 100.0 * score, "tokenizer": used}
