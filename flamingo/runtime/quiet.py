"""Silencing transformers' own progress bars (loading and saving weights), and two start-up warnings of other
packages that say nothing about a run of ours."""

from __future__ import annotations

import logging

# (logger, the start of a message it logs that no command of ours needs to show)
IRRELEVANT_WARNINGS = (
    # torchao's optional compiled kernels (MX formats, CUTLASS for sm90a) that do not load with a CPU build of torch
    # or another CUDA build; the quantized modes (model/quantize.py) and 8-bit optimizer states use none of them
    ("torchao", "Failed to load "),
    # torchao registering enums as pytree constants, deprecated by torch 2.13; nothing for a user to do
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_transformers(no_progress: bool) -> None:
    """transformers' bars follow a command's progress switch and show on rank 0 only under torchrun. The switch is
    process-wide: commands call it (the CLI, the demo), library code never does."""
    from .distributed import dist_info  # torch: only when a command runs

    if no_progress or dist_info()[0] != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def quiet_irrelevant_warnings() -> None:
    """Drop `IRRELEVANT_WARNINGS` in this process (other warnings of those loggers still show). Commands call it
    before they import transformers (the CLI's `main`), library code never does."""
    for name, prefix in IRRELEVANT_WARNINGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))
