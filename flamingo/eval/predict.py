"""From samples + demos to prediction records: prompt assembly, batched generation, candidate ranking."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ..config import MEDIA_TOKEN
from ..model.feature_cache import VisionFeatureCache
from ..model.flamingo import Flamingo
from ..processing import FlamingoProcessor
from ..runtime import TensorCache
from .task import Sample, Task

MEDIA_CACHE_BYTES = 2**30  # 1 GiB: ~1,780 224-px images (588 KiB of float32 each), ~220 8-frame 224-px videos


class MediaLoader:
    """Preprocessed media `(F, C, H, W)` by path, the most recently used kept within `max_bytes` of pixels (demo
    images recur across queries; a budget in bytes, as a video holds its frames' worth of an image's); a file that
    cannot be read is tried once and remembered (`unreadable`)."""

    def __init__(self, processor: FlamingoProcessor, max_bytes: int = MEDIA_CACHE_BYTES) -> None:
        self.processor = processor
        self.cache = TensorCache(max_bytes)
        self.failed: dict[str, str] = {}  # path -> why it cannot be read (missing, undecodable, truncated)

    def __call__(self, path: str, keep: bool = True) -> torch.Tensor:
        """keep: store it for later prompts (False for a pass over every train image, RICES's features, which would
        evict the demo media the prompts reuse)."""
        tensor = self.cache.get(path)
        if tensor is None:
            tensor = self.processor.preprocess_media(path)
            if keep:
                self.cache.put(path, tensor)
        return tensor

    def try_load(self, path: str, keep: bool = True) -> Optional[torch.Tensor]:
        """`self(path, keep)`, or None when the file cannot be read (why: `failed[path]`; each file is tried once)."""
        if path in self.failed:
            return None
        try:
            return self(path, keep)
        except ValueError as e:  # the processor's error for a missing, undecodable or truncated file
            self.failed[path] = str(e)
            return None

    def unreadable(self, paths: Sequence[str]) -> Optional[str]:
        """Why the first of `paths` that cannot be read fails (the processor's error), or None when all can."""
        return next((self.failed[p] for p in paths if self.try_load(p) is None), None)


def build_prompt(task: Task, sample: Sample, demos: Sequence[Sample], with_media: bool = True) -> tuple[str, list[str]]:
    """(prompt text, media paths in order) for one query and its demos. Template prompts put `task.demo_separator`
    after every demo, the last one too (OpenFlamingo's `...<|endofchunk|>\\n<image>Question:...`); chat prompts are
    the format's turns."""
    if task.chat is not None:
        text = task.chat_prompt(demos, sample, with_media)
    else:
        text = task.join_prompt([task.demo_prompt(d, with_media) + task.demo_separator for d in demos]
                                + [task.query_prompt(sample)])
    media = [m for d in demos for m in d.media] if with_media else []
    return text, media + list(sample.media)


def needed_tokens(processor: FlamingoProcessor, task: Task, sample: Sample, prompt_text: str,
                  max_new_tokens: int, fed_last: bool = False) -> int:
    """Positions the LM must hold for one query: its prompt plus the longest candidate continuation (ranked
    tasks) or `max_new_tokens` (generation). A query needing more than `processor.max_length` is skipped. A
    candidate's last token is scored, never fed (`score_batch`), so it takes no position, but where `fed_last` (a
    server scores prompt and candidate as one echoed prompt)."""
    length = len(processor.prompt_ids(prompt_text))  # in its template, as encoded (IDEFICS's wrappers count)
    if task.kind == "generate":
        return length + max_new_tokens
    ids = continuation_ids_of(processor, task, task.candidates_for(sample), prompt_text)
    return length + max(len(i) for i in ids) - (0 if fed_last else 1)


def continuation_ids_of(processor: FlamingoProcessor, task: Task, candidates: Sequence[str],
                        prompt: str) -> list[list[int]]:
    """Ranked tasks: each candidate's continuation token ids as they follow the prompt text `prompt`, split as
    lm-eval-harness splits them: the ids of query + continuation after the query's own ids when those are a prefix
    of them, else the continuation tokenized alone. So the scored tokens are those of the prompt with its answer
    written out, as the demos show theirs: a tokenizer that starts every text run with a word-start `▁` (LLaMA-1's,
    kept for IDEFICS, Otter, OpenFlamingo v1) gives a continuation tokenized alone one more; byte-level BPE (GPT-2,
    NeoX, MPT) gives the same ids either way. The query is the prompt from its last `<image>`, a special token, so
    what comes before cannot change the split; ids are cached per (query, candidate) in `task.continuation_ids`."""
    query = prompt[max(prompt.rfind(MEDIA_TOKEN), 0):]
    found = {c: task.continuation_ids.get((query, c)) for c in candidates}
    if any(ids is None for ids in found.values()):
        head = processor.prompt_ids(query)
        for c, ids in found.items():
            if ids is None:
                found[c] = _tail_ids(processor, head, query, task.continuation(c, query))
                if not found[c]:  # nothing to score (its log-likelihood would be 0, or a mean of nothing)
                    raise ValueError(f"{task.name}: the candidate {c!r} adds no token after the prompt "
                                     f"(continuation {task.continuation(c, query)!r}): give candidates with text")
                task.continuation_ids.put((query, c), found[c])
    return [found[c] for c in candidates]  # type: ignore[misc]


def _tail_ids(processor: FlamingoProcessor, head: list[int], query: str, continuation: str) -> list[int]:
    """The ids `continuation` adds after `query` (whose ids are `head`): the tail of the joint text's ids, or, when
    the joint text's ids do not start with `head` (a token spanning the boundary), the continuation's alone."""
    whole = processor.prompt_ids(query + continuation)
    if len(whole) > len(head) and whole[:len(head)] == head:
        return whole[len(head):]
    return processor.token_ids(continuation, special_tokens=False)


def _left_padded_inputs(model: Flamingo, processor: FlamingoProcessor, load: MediaLoader,
                        prompts: Sequence[tuple[str, list[str]]], image_references: bool = False) -> dict[str, Any]:
    """Prompts (text, media paths) -> the model's left-padded batch on its device (images in the tower's dtype)."""
    encoded = [processor.encode_prompt(text, [load(m) for m in media], image_references=image_references)
               for text, media in prompts]
    batch = processor.pad([ids for ids, _ in encoded], padding_side="left")
    batch.update(processor.batch_media([m for _, m in encoded]))
    device = next(model.parameters()).device
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if "images" in out:
        out["images"] = out["images"].to(next(model.vision.parameters()).dtype)
    return out


@contextlib.contextmanager
def seeded_sampling(seed: Optional[Sequence[int]], device: torch.device) -> Iterator[None]:
    """torch's random state seeded from `seed` for one sampled generation on `device`, the caller's restored after:
    transformers draws its samples from torch's default generators, which take no seed per call. seed: entropy (the
    trial's seed, the batch's first sample index); None leaves the state alone."""
    if seed is None:
        yield
        return
    value = int(np.random.SeedSequence([int(s) for s in seed]).generate_state(1)[0])
    # torch.manual_seed seeds the CPU and every device of the accelerator's kind: all of them are forked
    devices = list(range(torch.get_device_module(device.type).device_count())) if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(value)
        yield


@torch.no_grad()
def generate_batch(model: Flamingo, processor: FlamingoProcessor, load: MediaLoader, task: Task,
                   prompts: Sequence[tuple[str, list[str]]], *, seed: Optional[Sequence[int]] = None,
                   **generation: Any) -> list[dict[str, Any]]:
    """Left-padded prompts through `model.generate` -> [{"prediction", "raw"}] (raw: the decoded new text, up to a chat
    format's stop strings, `Task.answer_text`). seed: with `do_sample`, the draws' entropy (`seeded_sampling`), so
    the same seed and batch give the same samples."""
    inputs = _left_padded_inputs(model, processor, load, prompts, task.image_references)
    settings = task.generation_settings(generation)
    if int(settings["num_beams"]) == 1:  # greedy: a beam-only setting would only draw transformers' warning
        settings.pop("length_penalty", None)
    with seeded_sampling(seed if settings.get("do_sample") else None, inputs["input_ids"].device):
        out = model.generate(**inputs, **settings)  # (B, T + new)
    new = out[:, inputs["input_ids"].shape[1]:]
    texts = processor.batch_decode(new, skip_special_tokens=True)
    return [{"prediction": task.prediction(t), "raw": task.answer_text(t)} for t in texts]


@torch.no_grad()
def rank_batch(model: Flamingo, processor: FlamingoProcessor, load: MediaLoader, task: Task,
               samples: Sequence[Sample], prompts: Sequence[tuple[str, list[str]]], batch_size: int = 64,
               vision_cache: Optional[VisionFeatureCache] = None) -> list[dict[str, Any]]:
    """Score every candidate of each sample after its prompt, the prompts left-padded into one `score_batch` call
    -> the task's prediction records."""
    candidates = [task.candidates_for(sample) for sample in samples]
    inputs = _left_padded_inputs(model, processor, load, prompts, task.image_references)
    continuations = [continuation_ids_of(processor, task, c, text) for c, (text, _) in zip(candidates, prompts)]
    scores = model.score_batch(inputs.pop("input_ids"), continuations, batch_size=batch_size,
                               vision_cache=vision_cache, **inputs)  # B x (C_b,)
    return [task.from_scores(sample, cands, task.candidate_scores(s.tolist(), conts))
            for sample, cands, s, conts in zip(samples, candidates, scores, continuations)]
