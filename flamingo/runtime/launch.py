"""Running a Python module in several processes of one machine under torchrun, and what each rank's torch prints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Mapping, Optional, Sequence

CPP_LOG_LEVEL = "TORCH_CPP_LOG_LEVEL"  # the level of torch's C++ log lines, read once, when torch loads


def cpp_log_level(env: Mapping[str, str]) -> Optional[str]:
    """The C++ log level a process with environment `env` should load torch with: ERROR on a torchrun rank other
    than 0, so that a C++ notice every rank prints the same (DDP's "find_unused_parameters=True was specified ...
    but did not find any unused parameters", which no config of ours can act on) comes once, from rank 0; errors
    still show on every rank. None where nothing changes: one process, rank 0, or a level the user set."""
    if CPP_LOG_LEVEL in env or env.get("RANK", "0").strip() in ("", "0"):
        return None
    return "ERROR"


def quiet_cpp_notices_off_rank_0() -> bool:
    """Set `cpp_log_level` in this process's environment; returns whether it did. Torch reads the level once, as
    it loads, so a command calls this first thing (before anything imports torch); with torch loaded already it
    changes nothing and returns False."""
    level = cpp_log_level(os.environ)
    if level is None or "torch" in sys.modules:
        return False
    os.environ[CPP_LOG_LEVEL] = level
    return True


def torchrun_command(procs: int, module: str, args: Sequence[str] = (), *, executable: str = "torchrun"
                     ) -> list[str]:
    """The command line that runs `python -m module args` in `procs` processes. `executable="torchrun"` gives the
    line a person types; `run_torchrun` runs the same through this interpreter (`python -m torch.distributed.run`)."""
    head = [executable] if executable == "torchrun" else [executable, "-m", "torch.distributed.run"]
    return head + ["--standalone", f"--nproc_per_node={procs}", "-m", module, *args]


def run_torchrun(procs: int, module: str, args: Sequence[str] = (), *, what: str, hint: str = "") -> None:
    """Run `module` in `procs` processes of one thread each and wait; a failure raises RuntimeError naming `what`,
    the exit code and the command. TORCH_CPP_LOG_LEVEL=ERROR hides DDP's C++ notices on every rank (e.g. that
    find_unused_parameters found none); a torchrun a person starts keeps them on rank 0 (`cpp_log_level`)."""
    command = torchrun_command(procs, module, args, executable=sys.executable)
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR")
    code = subprocess.run(command, env=env).returncode
    if code < 0:  # killed: the hint (about the stage's own failures) does not apply
        why = "the out-of-memory killer's SIGKILL?" if -code == signal.SIGKILL else "stopped from outside"
        raise RuntimeError(f"{what} was killed by {signal.Signals(-code).name} ({why}); its command: "
                           + " ".join(command))
    if code != 0:
        raise RuntimeError(f"{what} failed with exit code {code}{' (' + hint + ')' if hint else ''}; its command: "
                           + " ".join(command))
