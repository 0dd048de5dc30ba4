"""Warnings that name the user's line: the first frame outside the flamingo package, however deep inside it the
warning is raised."""

from __future__ import annotations

import os
import sys
import warnings

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # .../flamingo/


def warn_outside(message: str, category: type[Warning] = UserWarning, *, also: tuple[str, ...] = ()) -> None:
    """`warnings.warn(message, category)` attributed to the first calling frame outside flamingo and the `also`
    directories (torch's: its `no_grad` wrapper sits between a user and `generate`), so the warning names the line a
    user wrote (the one that built a Trainer or called generate), and `-W`/filters by module apply to it."""
    internal = (PACKAGE, *(os.path.join(os.path.abspath(d), "") for d in also))
    frame, level = sys._getframe(1), 2  # level 2: this function's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
