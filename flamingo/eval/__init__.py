"""Few-shot evaluation (Flamingo §3.3 / OpenFlamingo): VQA, captioning, classification, HatefulMemes, VisDial, MME,
multi-image questions, video QA (open and multiple choice) and video captioning, with random or RICES demos, several
trials, distributed over torchrun ranks. See docs/eval.md."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import evaluate
    from .task import Sample, Task
    from .tasks import TASKS, get_task

# Names load on first use (PEP 562): `flamingo eval --help` lists the tasks without importing the model.
_HOMES = {"evaluate": ".runner", "Sample": ".task", "Task": ".task", "TASKS": ".tasks", "get_task": ".tasks"}
__all__ = ["evaluate", "Sample", "Task", "TASKS", "get_task"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'flamingo.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
