"""Running a Python module in several processes of one machine under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Sequence


def torchrun_command(procs: int, module: str, args: Sequence[str] = (), *, executable: str = "torchrun"
                     ) -> list[str]:
    """The command line that runs `python -m module args` in `procs` processes. `executable="torchrun"` gives the
    line a person types; `run_torchrun` runs the same through this interpreter (`python -m torch.distributed.run`)."""
    head = [executable] if executable == "torchrun" else [executable, "-m", "torch.distributed.run"]
    return head + ["--standalone", f"--nproc_per_node={procs}", "-m", module, *args]


def run_torchrun(procs: int, module: str, args: Sequence[str] = (), *, what: str, hint: str = "") -> None:
    """Run `module` in `procs` processes of one thread each and wait; a failure raises RuntimeError naming `what`,
    the exit code and the command. TORCH_CPP_LOG_LEVEL=ERROR hides DDP's C++ notices (e.g. that
    find_unused_parameters found none)."""
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
