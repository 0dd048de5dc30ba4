"""Video captioning (MSVD / MSR-VTT / VATEX style): beam-search a caption of a video, score with CIDEr.

The same task as image captioning (template, "\\n" after each demo, decoding, metric); only the files differ, so
a model's image and video captioning scores come from one prompt format."""

from __future__ import annotations

from pathlib import Path

from .captioning import CaptioningTask
from .task import Sample, episode_fields, list_field, media_path, read_json_records


class VideoCaptioningTask(CaptioningTask):
    name = "video_captioning"
    requires = ("pycocoevalcap", "av")

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        samples = []
        path = root / f"{split}.json"
        for rec in read_json_records(path, "video records"):
            captions = list_field(path, f"video {rec.get('id')!r}", rec.get("captions") or [], "captions",
                                  "a list of strings", (str,))
            if not captions:
                raise ValueError(f"{str(path)!r}: video {rec.get('id')!r} has no captions")
            samples.append(Sample(id=str(rec["id"]), media=[media_path(root, rec["video"])], fields={},
                                  answer=captions[0].strip(), references=captions, **episode_fields(rec)))
        return samples
