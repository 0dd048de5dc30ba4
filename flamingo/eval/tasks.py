"""The task registry: name -> Task class."""

from __future__ import annotations

from typing import Optional

from .captioning import CaptioningTask, check_caption_demos
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


def check_task_options(name: str, rank_by: Optional[str] = None, demo_answer: Optional[str] = None,
                       caption_demos: Optional[str] = None, *, flags: bool = False) -> None:
    """Refuse, by name, an option task `name` has no use for: `rank_by` (ranked tasks), `demo_answer` (VQA) or
    `caption_demos` (captioning: `check_caption_demos`); the CLI asks before the model loads (`flags`: named as its
    options)."""
    check_caption_demos(name, caption_demos, flags=flags)
    cls = TASKS[name]
    if rank_by is not None and cls.kind != "rank":
        raise ValueError(f"{'--rank-by' if flags else 'rank_by'} applies to ranked tasks; {name} generates its answers")
    if demo_answer is not None and not issubclass(cls, VQATask):
        raise ValueError(f"{'--demo-answer' if flags else 'demo_answer'} applies to the vqa task (VQAv2's layout: a "
                         f"consensus and the human answers of a question); {name} shows its demos' own answers")


def get_task(name: str, template: Optional[str] = None, answer_prefix: Optional[str] = None,
             cider_tokenizer: str = "auto", demo_separator: Optional[str] = None,
             rank_by: Optional[str] = None, demo_answer: Optional[str] = None,
             caption_demos: Optional[str] = None) -> Task:
    """A task by name; `template` / `answer_prefix` / `demo_separator` (the text after each demo; None: the task's)
    override its prompt, `cider_tokenizer` its CIDEr tokenizer, `rank_by` how a ranked task scores its candidates
    ("sum" or "mean", `Task.rank_by`), `demo_answer` which human answer a VQA demo shows ("consensus" or "first",
    `VQATask.demo_answer`), `caption_demos` the Karpathy splits captioning's demos come from
    (`CaptioningTask.caption_demos`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    if demo_separator is not None and not isinstance(demo_separator, str):
        raise ValueError(f"demo_separator must be a string, got {demo_separator!r}")
    check_task_options(name, rank_by, demo_answer, caption_demos)
    cls = TASKS[name]
    if cls is CaptioningTask:
        task = cls(template, answer_prefix, tokenizer=cider_tokenizer, caption_demos=caption_demos)
    elif cls is VideoCaptioningTask:
        task = cls(template, answer_prefix, tokenizer=cider_tokenizer)
    elif issubclass(cls, VQATask):
        task = cls(template, answer_prefix, rank_by=rank_by, demo_answer=demo_answer)
    else:
        task = cls(template, answer_prefix, rank_by=rank_by)
    if demo_separator is not None:
        task.demo_separator = demo_separator
    return task
