"""From samples + demos to prediction records: prompt assembly, batched generation, candidate ranking."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch

from ..model.flamingo import Flamingo
from ..processing import FlamingoProcessor
from .task import Sample, Task


class MediaLoader:
    """Preprocessed media `(F, C, H, W)` by path, with an LRU cache (demo images recur across queries)."""

    def __init__(self, processor: FlamingoProcessor, capacity: int = 512) -> None:
        self.processor, self.capacity = processor, capacity
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, path: str) -> torch.Tensor:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        tensor = self.processor.preprocess_media(path)
        self._cache[path] = tensor
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return tensor


def build_prompt(task: Task, sample: Sample, demos: Sequence[Sample], with_media: bool = True) -> tuple[str, list[str]]:
    """(prompt text, media paths in order) for one query and its demos."""
    text = "".join(task.demo_prompt(d, with_media) for d in demos) + task.query_prompt(sample)
    media = [m for d in demos for m in d.media] if with_media else []
    return text, media + list(sample.media)


def _to_device(model: Flamingo, batch: dict[str, Any]) -> dict[str, Any]:
    device = next(model.parameters()).device
    dtype = next(model.vision.parameters()).dtype
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if "images" in out:
        out["images"] = out["images"].to(dtype)
    return out


@torch.no_grad()
def generate_batch(model: Flamingo, processor: FlamingoProcessor, load: MediaLoader, task: Task,
                   prompts: Sequence[tuple[str, list[str]]], **generation: Any) -> list[dict[str, Any]]:
    """Left-padded prompts through `model.generate` -> [{"prediction", "raw"}] (raw = decoded new text)."""
    encoded = [processor.encode_prompt(text, [load(m) for m in media]) for text, media in prompts]
    batch = processor.pad([ids for ids, _ in encoded], padding_side="left")
    batch.update(processor.batch_media([m for _, m in encoded]))
    inputs = _to_device(model, batch)
    settings = {"max_new_tokens": task.max_new_tokens, "num_beams": task.num_beams, **generation}
    out = model.generate(**inputs, **settings)  # (B, T + new)
    new = out[:, inputs["input_ids"].shape[1]:]
    texts = processor.batch_decode(new, skip_special_tokens=True)
    return [{"prediction": task.postprocess(t), "raw": t} for t in texts]


@torch.no_grad()
def rank_one(model: Flamingo, processor: FlamingoProcessor, load: MediaLoader, task: Task, sample: Sample,
             prompt: tuple[str, list[str]], continuation_ids: dict[str, list[int]], batch_size: int = 64
             ) -> dict[str, Any]:
    """Score every candidate of `sample` after its prompt with `model.score` -> the task's prediction record."""
    candidates = task.candidates_for(sample)
    for c in candidates:
        if c not in continuation_ids:
            continuation_ids[c] = processor.tokenizer(task.continuation(c), add_special_tokens=False)["input_ids"]
    text, media = prompt
    ids, tensors = processor.encode_prompt(text, [load(m) for m in media])
    batch = {"input_ids": torch.tensor([ids]), **processor.batch_media([tensors])}
    inputs = _to_device(model, batch)
    scores = model.score(inputs.pop("input_ids"), [continuation_ids[c] for c in candidates],
                         batch_size=batch_size, **inputs)  # (C,)
    return task.from_scores(sample, candidates, scores.tolist())
