"""Captioning (COCO Karpathy layout): beam-search a caption, score with CIDEr (pycocoevalcap)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .cider import cider
from .task import Sample, Task, episode_fields, first_line, list_field, media_path, read_json

SPLITS = {"train": ("train", "restval"), "test": ("test",)}


class CaptioningTask(Task):
    name = "captioning"
    template = "<image>Output:{answer}<|endofchunk|>"
    metrics = ("cider",)
    requires = ("pycocoevalcap",)
    max_new_tokens = 20
    num_beams = 3
    demo_separator = "\n"  # after each demo, as OpenFlamingo's evaluate.py writes its captioning prompts

    def __init__(self, template: str | None = None, answer_prefix: str | None = None,
                 tokenizer: str = "auto") -> None:
        super().__init__(template, answer_prefix)
        self.tokenizer = tokenizer  # CIDEr's: "auto" (PTB when Java exists), "ptb" or "python"

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        path = root / "captions.json"
        images = read_json(path)["images"]
        samples = []
        for im in images:
            if im.get("split") not in SPLITS[split]:
                continue
            where = f"image {im.get('cocoid', im.get('filename'))!r}"
            sentences = list_field(path, where, im.get("sentences", []), "sentences", 'a list of {"raw": caption}',
                                   (dict,))
            captions = list_field(path, where, [s.get("raw") for s in sentences], "raw",
                                  "a string in every sentence", (str,))
            if not captions:
                raise ValueError(f"{str(path)!r}: {where} has no sentences")
            image = media_path(root, str(Path(im.get("filepath", "")) / im["filename"]))
            samples.append(Sample(id=str(im.get("cocoid", im["filename"])), media=[image], fields={},
                                  answer=captions[0].strip(), references=captions, **episode_fields(im)))
        return samples

    def postprocess(self, text: str) -> str:
        return first_line(text.split("Output")[0])

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        score, used = cider({s.id: p["prediction"] for s, p in zip(samples, predictions)},
                            {s.id: s.references for s in samples}, self.tokenizer)
        return {"cider": 100.0 * score, "tokenizer": used}
