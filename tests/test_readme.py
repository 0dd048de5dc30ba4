"""The README's quickstart runs offline as written and prints what the README says it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_prints_its_stated_output(tmp_path):
    text = README.read_text()
    code = re.search(r"## Quickstart.*?```python\n(.*?)```", text, re.S).group(1)
    expected = re.search(r"prints \(.*?\n\n```\n(.*?)```", text, re.S).group(1)
    (tmp_path / "quickstart.py").write_text(code)
    run = subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
