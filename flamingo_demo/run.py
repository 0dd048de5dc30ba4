"""What a `flamingo demo` run is made of: its settings, the tasks and ablations it evaluates, and the record of
what each stage produced (which the report renders and the goals check)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .sizes import DEFAULT_SIZE

# The demo's evaluation: name (the eval set the world writes, unless EVAL_SETS says) -> (harness task, headline
# metric).
TASKS: dict[str, tuple[str, str]] = {
    "vqa": ("vqa", "vqa_accuracy"),
    "captioning": ("captioning", "cider"),
    "classification": ("classification", "top1_accuracy"),
    "videoqa": ("videoqa", "accuracy"),
    "binding": ("classification", "top1_accuracy"),
    "multi_image": ("multi_image", "accuracy"),  # images named by reference (`<image0>`)
    "multi_image_plain": ("multi_image_plain", "accuracy"),  # the same questions, images named in words
}
EVAL_SETS: dict[str, str] = {"multi_image_plain": "multi_image"}
# Tasks evaluated at fewer shots than the demo's: a multi-image prompt holds 3 images a sample, and 8 shots of them
# would pass the LM's 256 positions.
TASK_SHOTS: dict[str, tuple[int, ...]] = {"multi_image": (0, 2, 4), "multi_image_plain": (0, 2, 4)}
# The paper's ablations as config overrides of the Flamingo stage.
ABLATIONS: dict[str, list[str]] = {
    "gating": ["model.flamingo.gated=false"],
    "xattn-every-4": ["model.flamingo.xattn_every=4"],
    "mlp-resampler": ["model.flamingo.resampler=mlp"],
    "unfrozen-lm": ["model.flamingo.freeze_lm=false"],
    "all-images": ["model.flamingo.only_attend_last_image=false"],  # each token sees every image before it
}
SHOTS = (0, 1, 2, 4, 8)


@dataclass
class DemoSettings:
    out: str = "flamingo-demo"
    size: str = DEFAULT_SIZE
    seed: int = 0
    ablate: Optional[str] = None
    shots: Sequence[int] = SHOTS
    progress: bool = True
    train_procs: int = 0  # processes of the Flamingo stage (DDP over gloo); 0: 2 on a machine with 2 cores or more
    eval_procs: int = 0  # processes of the evaluation stage (torchrun, strided query shards); 0: as for train_procs


@dataclass
class DemoRun:
    settings: DemoSettings
    times: dict[str, float] = field(default_factory=dict)
    world: dict[str, Any] = field(default_factory=dict)
    backbones: dict[str, Any] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)  # variant -> trained model dir
    commands: dict[str, str] = field(default_factory=dict)  # variant -> `flamingo train` command line
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # variant -> task -> results
    generations: list[dict[str, Any]] = field(default_factory=list)  # `flamingo generate` on hand-written prompts
    reused: list[str] = field(default_factory=list)  # stages whose output an earlier run left in `out`
