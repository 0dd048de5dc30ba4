"""matplotlib's pyplot on its file-only backend (Agg): every figure the library writes is a PNG, on machines with no
display. Imported when a figure is drawn, so matplotlib stays an optional dependency."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot`, drawing to files only (ImportError without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
