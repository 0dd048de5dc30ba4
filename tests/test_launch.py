"""`run_torchrun`: a failed stage names its exit code and hint; a killed one names the signal instead."""

import subprocess

import pytest

import flamingo.runtime.launch as launch


@pytest.mark.parametrize("code, message", [(1, "failed with exit code 1 (try one process)"),
                                           (-9, "killed by SIGKILL (the out-of-memory killer's SIGKILL?)"),
                                           (-15, "killed by SIGTERM (stopped from outside)")])
def test_a_failed_or_killed_run_says_which(monkeypatch, code, message):
    monkeypatch.setattr(launch.subprocess, "run", lambda command, env: subprocess.CompletedProcess(command, code))
    with pytest.raises(RuntimeError) as error:
        launch.run_torchrun(2, "flamingo.cli", ["train"], what="the stage", hint="try one process")
    assert message in str(error.value)
    assert ("try one process" in str(error.value)) == (code > 0)
    monkeypatch.setattr(launch.subprocess, "run", lambda command, env: subprocess.CompletedProcess(command, 0))
    launch.run_torchrun(2, "flamingo.cli", ["train"], what="the stage")
