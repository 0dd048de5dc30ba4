"""Video captioning (MSVD / MSR-VTT / VATEX style): beam-search a caption of a video, score with CIDEr.

The same task as image captioning (template, "\\n" after each demo, decoding, metric); only the files differ, so
a model's image and video captioning scores come from one prompt format."""

from __future__ import annotations

from pathlib import Path

from .captioning import CaptioningTask
from .task import Sample, episode_fields, media_path, read_json


class VideoCaptioningTask(CaptioningTask):
    name = "video_captioning"
    requires = ("pycocoevalcap", "av")

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        samples = []
        path = root / f"{split}.json"
        records = read_json(path)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            got = f"a {type(records).__name__}" if not isinstance(records, list) else "items that are not objects"
            raise ValueError(f"{str(path)!r} must be a JSON list of video records, got {got}")
        for rec in records:
            captions = rec.get("captions") or []
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"{str(path)!r} video {rec.get('id')!r}: 'captions' must be a list of strings, got "
                                 f"{captions!r:.80}")
            if not captions:
                raise ValueError(f"{str(path)!r}: video {rec.get('id')!r} has no captions")
            samples.append(Sample(id=str(rec["id"]), media=[media_path(root, rec["video"])], fields={},
                                  answer=captions[0].strip(), references=captions, **episode_fields(rec)))
        return samples
