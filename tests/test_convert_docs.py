"""The commands docs/convert.md shows, read as bash reads them: each argument is what the command gets (a prompt's
line break a real one, never a backslash and an `n`: the CLI unescapes nothing), and the IDEFICS prompt written out
is the one `--chat` writes."""

import shutil
import subprocess
from pathlib import Path

import pytest

from flamingo.chat import IdeficsChat, Turn

DOC = Path(__file__).resolve().parents[1] / "docs" / "convert.md"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the doc's commands are bash")


def _commands() -> list[str]:
    """Each `flamingo ...` command of the doc's bash blocks, its continuation lines joined."""
    commands, in_bash, joined = [], False, ""
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            in_bash = not in_bash and line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        joined += line
        if joined.endswith("\\"):
            joined = joined[:-1]
            continue
        if joined.startswith("flamingo "):
            commands.append(joined)
        joined = ""
    return commands


def _argv(command: str) -> list[str]:
    """The arguments bash gives `flamingo` in `command` (a shell function stands in for it: nothing runs)."""
    script = 'flamingo() { printf "%s\\0" "$@"; }\n' + command
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split("\0")[:-1]


def _prompt(argv: list[str]) -> str:
    return argv[argv.index("--prompt") + 1]


def test_no_argument_holds_a_backslash_escape():
    commands = _commands()
    assert len(commands) > 10 and any(c.startswith("flamingo generate") for c in commands)
    for command in commands:
        assert not any("\\n" in arg for arg in _argv(command)), command


def test_the_idefics_prompt_is_the_one_its_chat_format_writes():
    generate = [_argv(c) for c in _commands() if c.startswith("flamingo generate --model idefics9b")]
    written = [a for a in generate if "--chat" not in a]
    chat = [a for a in generate if "--chat" in a]
    assert len(written) == len(chat) == 1
    expected = IdeficsChat().render([Turn("user", ("<image>", _prompt(chat[0])))])
    assert _prompt(written[0]) == expected == "User:<image>What is in this image?<end_of_utterance>\nAssistant:"
