"""Figures drawn to files only: a `matplotlib.figure.Figure` made outside pyplot, saved with `fig.savefig` (an Agg
canvas for a PNG). The process's backend is never switched and no figure joins pyplot's registry, so a notebook's
own plots keep showing after a run or an evaluation writes its pictures, on machines with no display too. Imported
when a figure is drawn, so matplotlib stays an optional dependency."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def figure(**kwargs: Any) -> Figure:
    """A new `Figure(**kwargs)` (figsize, dpi, ...) that only `savefig` draws (ImportError without matplotlib)."""
    import matplotlib.figure  # binds the package too: fails without matplotlib (or with sys.modules' None for it)

    return matplotlib.figure.Figure(**kwargs)
