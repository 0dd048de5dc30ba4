"""What an install holds and what a partial install says: every third-party package the code imports is declared in
pyproject.toml, whose extras docs/install.md's table lists as they are; a command or a video that needs an optional
package names the extra that installs it in one line; reading a training config loads no torch; the sdist holds every
tracked file (tests, their helpers and the files they read) and the license text the metadata declares."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import pytest

from flamingo.cli import needs_extra
from flamingo.eval.extras import PACKAGES
from flamingo.video import decode_video

ROOT = Path(__file__).resolve().parents[1]
OURS = ("flamingo", "flamingo_demo")  # the packages the distribution installs: their modules are scanned
# import name -> distribution, for those that install under another name and may be missing here (the installed ones'
# metadata says it: importlib.metadata.packages_distributions)
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}
TEST_EXTRA = "test"  # its packages cover no import of the library: a user's install lacks them


def _normalized(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): `PyYAML`, `pyyaml` and `python_multipart` alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    """The distribution a requirement names: `lm_eval[api]>=0.4.13` -> `lm-eval`."""
    return _normalized(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    """pyproject.toml's `dependencies` and its extras (name -> distributions), names normalized."""
    tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    return (
        {_requirement_name(r) for r in project["dependencies"]},
        {extra: {_requirement_name(r) for r in requirements} for extra, requirements in extras.items()},
    )


@lru_cache(maxsize=1)
def _installed() -> Mapping[str, list[str]]:
    """Top-level import name -> the installed distributions that provide it (read once: it scans every one)."""
    return importlib.metadata.packages_distributions()


def _distributions(name: str) -> set[str]:
    """The distributions that install the top-level import `name`: the installed ones', else the table's, else the
    import name itself."""
    installed = _installed().get(name, [])
    return {_normalized(d) for d in installed} or {_normalized(DISTRIBUTIONS.get(name, name))}


@dataclass(frozen=True)
class Import:
    """A third-party import statement: where it is and the top-level package it imports."""

    module: str  # the file, relative to the repository
    line: int
    package: str  # the top-level import name (`PIL` of `from PIL import Image`)
    where: str  # "at module level" or "in NAME()": the innermost function holding it


def _third_party(name: Optional[str]) -> Optional[str]:
    """The top-level package of an imported module's name, None for the standard library and our own packages."""
    top = (name or "").partition(".")[0]
    return None if not top or top in sys.stdlib_module_names or top in OURS else top


def _imported(node: ast.AST) -> list[str]:
    """The third-party top-level packages an import statement imports (relative imports are ours)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
    else:
        return []
    return [top for top in map(_third_party, names) if top is not None]


def _imports(node: ast.AST, module: str, where: str = "at module level") -> list[Import]:
    """The third-party imports under `node`: at module level, in functions, classes, branches and `try` blocks."""
    found = []
    for child in ast.iter_child_nodes(node):
        found += [Import(module, child.lineno, package, where) for package in _imported(child)]
        inner = f"in {child.name}()" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
        found += _imports(child, module, inner)
    return found


def _sources() -> list[Path]:
    """Every module the distribution installs."""
    return sorted(path for package in OURS for path in (ROOT / package).rglob("*.py"))


def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_every_third_party_import_is_declared():
    """Each package a module imports, at module level or inside a function (an optional one, imported when used), is
    in pyproject.toml's `dependencies` or one of its extras other than `test`: a user's install has it, or the extra
    its error message names does. A transitive dependency imported directly is declared too (starlette and pydantic,
    which fastapi brings today but need not tomorrow)."""
    core, extras = _declared()
    covered = core.union(*(packages for extra, packages in extras.items() if extra != TEST_EXTRA))
    imports = [i for path in _sources() for i in _imports(_parsed(path), str(path.relative_to(ROOT)))]
    assert {"torch", "transformers", "fastapi", "av"} <= {i.package for i in imports}  # the scan sees them all
    undeclared = [
        f"{i.module}:{i.line} imports {i.package} {i.where}: {' or '.join(sorted(_distributions(i.package)))}"
        " is in neither pyproject.toml's dependencies nor an extra (see docs/install.md)"
        for i in imports
        if not _distributions(i.package) & covered
    ]
    assert undeclared == []


def test_the_extras_that_messages_name_exist_and_install_what_they_say():
    """`needs_extra(command, EXTRA)` names an extra of pyproject.toml that holds the packages imported in its block;
    so does every `flamingo-vlm[EXTRA]` and `pip install -e ".[EXTRA]"` of the code and the docs, and the eval tasks'
    table of packages (`flamingo.eval.extras.PACKAGES`)."""
    core, extras = _declared()
    problems, blocks = [], 0
    for path in _sources():
        module = str(path.relative_to(ROOT))
        for node in ast.walk(_parsed(path)):
            calls = [item.context_expr for item in node.items] if isinstance(node, (ast.With, ast.AsyncWith)) else []
            for call in calls:
                if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "needs_extra"):
                    continue
                blocks += 1
                extra = call.args[1] if len(call.args) > 1 else None
                if not (isinstance(extra, ast.Constant) and extra.value in extras):
                    named = ast.unparse(extra) if extra is not None else "nothing"
                    problems.append(f"{module}:{call.lineno}: needs_extra names {named}, no extra of pyproject.toml")
                    continue
                for i in (i for statement in node.body for i in _imports(ast.Module([statement], []), module)):
                    if not _distributions(i.package) & extras[extra.value]:
                        problems.append(
                            f"{module}:{i.line}: {i.package} is imported under needs_extra(..., "
                            f"{extra.value!r}) but not in that extra"
                        )
    assert blocks >= 2  # `flamingo serve` and `flamingo batch`
    texts = [*_sources(), ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = r"""flamingo-vlm\[([\w,-]+)\]|pip install -e "\.\[([\w,-]+)\]"""
    for path in texts:
        for match in re.finditer(named, path.read_text(encoding="utf-8")):
            for extra in (match.group(1) or match.group(2)).split(","):
                if extra not in extras:
                    problems.append(f"{path.relative_to(ROOT)}: {match.group(0)} names no extra of pyproject.toml")
    for module, (package, _, extra) in PACKAGES.items():
        if _normalized(package) not in extras.get(extra, set()):
            problems.append(f"flamingo/eval/extras.py: {module} -> {package} is not in the extra {extra!r}")
    assert problems == []


def test_the_install_docs_table_lists_each_extra_as_pyproject_declares_it():
    """docs/install.md's table of extras is the one reference: a row per extra (and `(none)`: the dependencies), with
    the same packages as pyproject.toml."""
    core, extras = _declared()
    rows = {}
    for line in (ROOT / "docs" / "install.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        packages = re.findall(r"`([^`]+)`", cells[1]) if line.startswith("|") and len(cells) == 3 else []
        if packages:
            rows[cells[0].strip("`")] = {_requirement_name(p) for p in packages}
    assert rows == {"(none)": core, **extras}


def test_the_convert_extra_installs_no_pair_known_to_fail():
    """Every sentencepiece/protobuf pair the `convert` extra allows reads a SentencePiece-only tokenizer: sentencepiece
    0.1.x fails under every protobuf >= 4.21.1 ("Descriptors cannot be created directly") and 0.2.3's generated code
    under any protobuf older than 7.36.1. Checked in fresh venvs against PyPI at the floors (0.2.0, 7.36.1) and at
    pip's choice (0.2.3, 7.36.2); tests/test_tokenizer_legacy.py loads one when both are installed."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    ranges = {r.name: r.specifier for r in map(Requirement, extra["convert"])}
    assert set(ranges) == {"sentencepiece", "protobuf"}
    assert not ranges["sentencepiece"].contains("0.1.99") and ranges["sentencepiece"].contains("0.2.0")
    assert not ranges["protobuf"].contains("7.36.0") and ranges["protobuf"].contains("7.36.1")


def test_reading_a_training_config_imports_no_torch():
    """The CLI reads the config before any model work: a mistake in it is reported without waiting for torch to load.
    `train.device`, when set, is checked with torch (runtime.device)."""
    code = (
        "import sys; from flamingo.train.config import load_config; imported = 'torch' in sys.modules; "
        "load_config('configs/example.yaml'); print(imported, 'torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "False"]


def test_serve_and_batch_without_the_serve_extra_say_how_to_install_it(tmp_path):
    """Run as a user's fresh process runs them: the serve modules are imported by the command, not cached from
    another test. A package that is None in sys.modules raises ModuleNotFoundError on import, as a missing one.
    `serve` imports uvicorn only once the model is loaded: the command checks it before any model work."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("{}\n")
    code = (
        "import sys; sys.modules['fastapi'] = sys.modules['uvicorn'] = None; from flamingo.cli import main; "
        "print(main(['serve', '--model', 'no-model']), "
        f"main(['batch', '--model', 'no-model', '--input', {str(requests)!r}, '--output', 'out.jsonl']))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.split()[-2:] == ["2", "2"], run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("flamingo: error:")]
    assert errors == [
        "flamingo: error: flamingo serve needs uvicorn: pip install 'flamingo-vlm[serve]'",
        "flamingo: error: flamingo batch needs fastapi: pip install 'flamingo-vlm[serve]'",
    ]
    assert "Traceback" not in run.stderr


def test_a_missing_module_of_our_own_keeps_its_traceback():
    """Only a third-party package is an extra to install; a flamingo module missing is a broken install."""
    with pytest.raises(ModuleNotFoundError), needs_extra("flamingo serve", "serve"):
        raise ModuleNotFoundError("No module named 'flamingo.serve.gone'", name="flamingo.serve.gone")
    with pytest.raises(ValueError, match=r"flamingo serve needs starlette: pip install 'flamingo-vlm\[serve\]'"):
        with needs_extra("flamingo serve", "serve"):
            raise ModuleNotFoundError("No module named 'starlette.requests'", name="starlette.requests")


def test_a_video_without_pyav_says_how_to_install_it(monkeypatch, tmp_path):
    """An ImportError, not the ValueError of a bad file, which data loaders skip: every video would be skipped."""
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"videos need PyAV \(av\): pip install 'flamingo-vlm\[video\]'"):
        decode_video(str(tmp_path / "clip.mp4"))


def _git_files(*options: str) -> list[str]:
    """`git ls-files OPTIONS` of the checkout, less the files deleted in the working tree."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the sdist is checked against `git ls-files`)")
    listed = subprocess.run(["git", "ls-files", "-z", *options], cwd=ROOT, capture_output=True, check=True).stdout
    return sorted(f for f in listed.decode().split("\0") if f and os.path.isfile(ROOT / f))


def test_the_sdist_holds_every_tracked_file_and_the_license(tmp_path):
    """Built from a copy (a build writes an egg-info folder beside the sources): a packager can run the tests from
    the sdist, and the Apache-2.0 text the metadata names comes with it (and with the wheel: same metadata)."""
    pytest.importorskip("setuptools", minversion="77")  # pyproject's build requirement (license-files)
    tracked = _git_files("--cached")
    source = tmp_path / "source"
    for name in _git_files("--cached", "--others", "--exclude-standard"):  # the tree a commit would hold
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path / 'dist')!r}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    archive = tmp_path / "dist" / run.stdout.split()[-1]
    with tarfile.open(archive) as tar:
        top = archive.name.removesuffix(".tar.gz")
        names = {m.name.removeprefix(top + "/") for m in tar.getmembers() if m.isfile()}
        metadata = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    assert [f for f in tracked if f not in names] == []
    assert {"LICENSE", "tests/conftest.py", "tests/helpers.py", "configs/mini.yaml", "bench/common.py"} <= names
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
