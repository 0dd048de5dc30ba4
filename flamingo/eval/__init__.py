"""Few-shot evaluation (Flamingo §3.3 / OpenFlamingo): VQA, captioning, classification, HatefulMemes, VisDial, MME,
multi-image questions, video QA (open and multiple choice) and video captioning, with random or RICES demos, several
trials, distributed over torchrun ranks. See docs/eval.md."""

from .runner import evaluate
from .task import Sample, Task
from .tasks import TASKS, get_task

__all__ = ["evaluate", "Sample", "Task", "TASKS", "get_task"]
