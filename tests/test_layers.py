"""The package's layers: imports point one way, and no module imports a module that imports it back.

Every `import` counts, at module top or inside a function (an import hidden in a function is still a dependency);
only `if TYPE_CHECKING:` blocks are left out. Layers, bottom to top (a module may import its own layer and below):
config/runtime < model, processing, detokenize, video, references, chat < build, tiny, convert, peers, hub < data <
train, eval, serve (apart from each other) < cli.
The demo (`flamingo_demo`) sits beside the library: it may import the library's public modules but not its CLI, and
nothing in the library imports the demo except the CLI's `demo` subcommand.
"""

from __future__ import annotations

import ast
import os
import textwrap
from pathlib import Path
from typing import Iterable, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flamingo", "flamingo_demo")

LAYERS: list[tuple[str, ...]] = [
    ("flamingo.config", "flamingo.runtime"),
    ("flamingo.model", "flamingo.processing", "flamingo.detokenize", "flamingo.video", "flamingo.references",
     "flamingo.chat"),
    ("flamingo.build", "flamingo.tiny", "flamingo.convert", "flamingo.peers", "flamingo.hub"),
    ("flamingo.data",),
    ("flamingo.train", "flamingo.eval", "flamingo.serve"),
    ("flamingo.cli", "flamingo.__main__"),
]
SIBLINGS_APART = [("flamingo.model", "flamingo.processing"), ("flamingo.train", "flamingo.eval"),
                  ("flamingo.eval", "flamingo.serve"), ("flamingo.train", "flamingo.serve")]
DEMO_MAY_NOT_IMPORT = ("flamingo.cli",)
LIBRARY_TO_DEMO_ALLOWED = {"flamingo.cli"}  # `flamingo demo` loads the demo lazily


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.body:
                for sub in ast.walk(child):
                    if hasattr(sub, "lineno"):
                        lines.add(sub.lineno)
    return lines


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The package modules `module` (at `path`) imports, anywhere in the file but `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import sub` depends on the submodule; `from pkg import name` on pkg itself
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for name in names:
            target = _resolve(name, known)
            if target is not None and target != module:
                found.add(target)
    return found


def _resolve(name: str, known: set[str]) -> Optional[str]:
    """The longest known module that `name` is or lies in (`a.b.c` -> `a.b` when `a.b.c` is an attribute)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    files = {module_name(p, root): p for pkg in packages if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py")}
    known = set(files)
    return {m: imports_of(p, m, known) for m, p in sorted(files.items())}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def in_group(module: str, group: str) -> bool:
    return module == group or module.startswith(group + ".")


def layer_of(module: str) -> Optional[int]:
    for i, layer in enumerate(LAYERS):
        if any(in_group(module, group) for group in layer):
            return i
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in graph.items():
        for target in sorted(targets):
            if module.startswith("flamingo_demo"):
                if any(in_group(target, g) for g in DEMO_MAY_NOT_IMPORT):
                    problems.append(f"{module} -> {target}: the demo uses the library's API, not its CLI")
                continue
            if target.startswith("flamingo_demo"):
                if module not in LIBRARY_TO_DEMO_ALLOWED:
                    problems.append(f"{module} -> {target}: the library does not import its demo")
                continue
            mine, theirs = layer_of(module), layer_of(target)
            if module == "flamingo" or mine is None or theirs is None:  # the package's re-exports
                continue
            if theirs > mine:
                problems.append(f"{module} (layer {mine}) -> {target} (layer {theirs}): imports point down")
            for a, b in SIBLINGS_APART:
                if (in_group(module, a) and in_group(target, b)) or (in_group(module, b) and in_group(target, a)):
                    problems.append(f"{module} -> {target}: {a} and {b} stay apart")
    return problems


def test_package_has_no_import_cycles():
    graph = import_graph(ROOT)
    assert "flamingo.model.flamingo" in graph and graph["flamingo.model.flamingo"]  # the walk sees the package
    assert find_cycles(graph) == []


def test_imports_point_down_the_layers():
    assert layer_violations(import_graph(ROOT)) == []


def test_every_library_module_has_a_layer():
    graph = import_graph(ROOT, ["flamingo"])
    assert [m for m in graph if m != "flamingo" and layer_of(m) is None] == []


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_checker_finds_a_cycle_hidden_inside_a_function(tmp_path):
    """The checks above can fail: a cycle added back through an import inside a function is found."""
    _write_package(tmp_path, {
        "flamingo/__init__.py": "",
        "flamingo/model/__init__.py": "",
        "flamingo/model/flamingo.py": """
            def generate():
                from ..generation import run  # hidden in a function: still a dependency
                return run()
            """,
        "flamingo/generation.py": "from .model.flamingo import generate\n",
        "flamingo/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .generation import run\n",
    })
    graph = import_graph(tmp_path, ["flamingo"])
    assert find_cycles(graph) == [["flamingo.generation", "flamingo.model.flamingo"]]
    assert graph["flamingo.typed"] == set()  # annotations only


def test_checker_finds_an_import_pointing_up(tmp_path):
    _write_package(tmp_path, {
        "flamingo/__init__.py": "",
        "flamingo/model/__init__.py": "",
        "flamingo/model/flamingo.py": "def f():\n    from flamingo.train.trainer import Trainer\n",
        "flamingo/train/__init__.py": "",
        "flamingo/train/trainer.py": "from flamingo.model.flamingo import f\nTrainer = object\n",
        "flamingo/eval/__init__.py": "",
        "flamingo/eval/runner.py": "import flamingo.train.trainer\n",
        "flamingo/cli.py": "import flamingo_demo.cli\n",
        "flamingo_demo/__init__.py": "",
        "flamingo_demo/cli.py": "from flamingo.cli import main\n",
        "flamingo/data/__init__.py": "from flamingo_demo import cli\n",
    })
    problems = layer_violations(import_graph(tmp_path))
    assert any(p.startswith("flamingo.model.flamingo (layer 1) -> flamingo.train.trainer (layer 4)") for p in problems)
    assert any(p.startswith("flamingo.eval.runner -> flamingo.train.trainer") for p in problems)
    assert any(p.startswith("flamingo_demo.cli -> flamingo.cli") for p in problems)
    assert any(p.startswith("flamingo.data -> flamingo_demo") for p in problems)
    assert not any(p.startswith("flamingo.cli ->") for p in problems)  # the CLI may load the demo


@pytest.mark.parametrize("package", ["flamingo"])
def test_no_sys_path_edits(package):
    offenders = [str(p) for p in (ROOT / package).rglob("*.py") if "sys.path" in p.read_text()]
    assert offenders == [], os.linesep.join(offenders)
