"""Few-shot evaluation (Flamingo §3.3 / OpenFlamingo): VQA, captioning, classification, HatefulMemes, VisDial, MME,
multi-image questions, video QA (open and multiple choice) and video captioning, with random or RICES demos, several
trials, distributed over torchrun ranks. See docs/eval.md."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..runtime.lazy import lazy_getattr

if TYPE_CHECKING:
    from .runner import evaluate
    from .task import Sample, Task
    from .tasks import TASKS, get_task

# Names load on first use (PEP 562): `flamingo eval --help` lists the tasks without importing the model.
_HOMES = {"evaluate": ".runner", "Sample": ".task", "Task": ".task", "TASKS": ".tasks", "get_task": ".tasks"}
__all__ = ["evaluate", "Sample", "Task", "TASKS", "get_task"]
__getattr__ = lazy_getattr(__name__, _HOMES)
