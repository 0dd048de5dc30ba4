"""What an install holds and what a partial install says: a command or a video that needs an optional package names
the extra that installs it in one line; the sdist holds every tracked file (tests, their helpers and the files they
read) and the license text the metadata declares."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from flamingo.cli import needs_extra
from flamingo.video import decode_video

ROOT = Path(__file__).resolve().parents[1]


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
