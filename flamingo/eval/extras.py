"""The third-party packages a task's metric or media need (`Task.requires`), checked before the model loads: found
missing only when the metric runs, after every prediction of the first shot count, they would lose that work.

The plot (results.png, matplotlib) is optional: without it `write_results` skips the plot with a warning."""

from __future__ import annotations

import importlib.util
from typing import Union

from .task import Task

# module -> (the package pip installs, what it is for, the extra of flamingo-vlm that installs it: pyproject.toml)
PACKAGES: dict[str, tuple[str, str, str]] = {
    "pycocoevalcap": ("pycocoevalcap", "CIDEr", "eval"),
    "sklearn": ("scikit-learn", "ROC-AUC", "eval"),
    "av": ("av", "PyAV: decoding videos", "video"),
}


def available(module: str) -> bool:
    """Whether `module` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a spec (set there by hand): importable
        return True


def check_requirements(task: Union[Task, type[Task]]) -> None:
    """Refuse `task` when a package its metric or media need (`task.requires`) is not installed: a ValueError naming
    each missing package and the extra that installs it (the CLI's one-line error)."""
    missing = [m for m in task.requires if not available(m)]
    if not missing:
        return
    needs = " and ".join(f"{PACKAGES[m][0]} ({PACKAGES[m][1]})" if m in PACKAGES else m for m in missing)
    extras = ",".join(dict.fromkeys(PACKAGES[m][2] for m in missing if m in PACKAGES))
    install = ([f"'flamingo-vlm[{extras}]'"] if extras else []) + [m for m in missing if m not in PACKAGES]
    raise ValueError(f"the {task.name} task needs {needs}: pip install {' '.join(install)}")
