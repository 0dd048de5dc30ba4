"""The task registry: name -> Task class."""

from __future__ import annotations

from typing import Optional

from .captioning import CaptioningTask
from .classification import ClassificationTask
from .hateful_memes import HatefulMemesTask
from .mme import MMETask
from .multi_image import MultiImagePlainTask, MultiImageTask
from .task import Task
from .video_captioning import VideoCaptioningTask
from .videoqa import VideoQATask
from .videoqa_mc import VideoQAChoiceTask
from .visdial import VisDialTask
from .vqa import VQATask

TASKS: dict[str, type[Task]] = {t.name: t for t in (VQATask, CaptioningTask, ClassificationTask, HatefulMemesTask,
                                                    VideoQATask, VideoQAChoiceTask, VideoCaptioningTask, MMETask,
                                                    MultiImageTask, MultiImagePlainTask, VisDialTask)}


def get_task(name: str, template: Optional[str] = None, answer_prefix: Optional[str] = None,
             cider_tokenizer: str = "auto") -> Task:
    """A task by name; `template` / `answer_prefix` override its prompt, `cider_tokenizer` its CIDEr tokenizer."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    cls = TASKS[name]
    if cls in (CaptioningTask, VideoCaptioningTask):
        return cls(template, answer_prefix, tokenizer=cider_tokenizer)
    return cls(template, answer_prefix)
