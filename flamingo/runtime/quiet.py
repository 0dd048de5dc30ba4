"""Silencing transformers' own progress bars (loading and saving weights)."""

from __future__ import annotations

from .distributed import dist_info


def quiet_transformers(no_progress: bool) -> None:
    """transformers' bars follow a command's progress switch and show on rank 0 only under torchrun. The switch is
    process-wide: commands call it (the CLI, the demo), library code never does."""
    if no_progress or dist_info()[0] != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
