"""Captioning (COCO Karpathy layout): beam-search a caption, score with CIDEr (pycocoevalcap).

Queries are the Karpathy `test` images. Demos come from the Karpathy splits `caption_demos` names
(`flamingo eval --caption-demos`): "train+restval", every training image (COCO's 113k, the default), or "train"
alone (COCO's 83k, without the 30k `restval` images), as OpenFlamingo's eval_datasets.py reads its demo pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from .cider import cider
from .task import Sample, Task, episode_fields, first_line, list_field, media_path, read_json

CAPTION_DEMOS = {"train+restval": ("train", "restval"), "train": ("train",)}  # name -> the Karpathy splits read


class CaptioningTask(Task):
    name = "captioning"
    template = "<image>Output:{answer}<|endofchunk|>"
    metrics = ("cider",)
    requires = ("pycocoevalcap",)
    max_new_tokens = 20
    num_beams = 3
    demo_separator = "\n"  # after each demo, as OpenFlamingo's evaluate.py writes its captioning prompts
    caption_demos = "train+restval"  # the demo pool, one of CAPTION_DEMOS (the module's docstring)

    def __init__(self, template: str | None = None, answer_prefix: str | None = None,
                 tokenizer: str = "auto", caption_demos: Optional[str] = None) -> None:
        super().__init__(template, answer_prefix)
        self.tokenizer = tokenizer  # CIDEr's: "auto" (PTB when Java exists), "ptb" or "python"
        check_caption_demos(self.name, caption_demos)  # video captioning's files have no Karpathy splits
        self.caption_demos = type(self).caption_demos if caption_demos is None else caption_demos

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        path = root / "captions.json"
        images = read_json(path)["images"]
        splits = CAPTION_DEMOS[self.caption_demos] if split == "train" else ("test",)
        samples = []
        for im in images:
            if im.get("split") not in splits:
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


def check_caption_demos(task: str, caption_demos: Optional[str], *, flags: bool = False) -> None:
    """Refuse `caption_demos` (None: not given) for a task other than captioning, whose Karpathy file alone has the
    splits it chooses among, or a value CAPTION_DEMOS lacks; the CLI asks before the model loads (`flags`: named as
    its option)."""
    if caption_demos is None:
        return
    option = "--caption-demos" if flags else "caption_demos"
    if task != CaptioningTask.name:
        raise ValueError(f"{option} applies to the captioning task (Karpathy's captions.json: train, restval and "
                         f"test images); {task} draws its demos from its whole train split")
    if caption_demos not in CAPTION_DEMOS:
        raise ValueError(f"{option} must be one of {tuple(CAPTION_DEMOS)}, got {caption_demos!r}")
