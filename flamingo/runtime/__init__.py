"""The bottom layer: what every other layer may use and nothing above it is imported by.

- `dtypes`: the dtype names of configs and command lines (fp32, bf16, fp16);
- `distributed`: rank, world size and device from torchrun's environment, joining its process group and leaving it;
- `launch`: running a module in several processes under torchrun;
- `quiet`: silencing transformers' own progress bars and other packages' start-up warnings irrelevant to a run;
- `lru`: one bounded least-recently-used store (by count or by bytes), and the tensor cache built on it;
- `checkpoint_io`: atomic directory writes;
- `hub`: where a model is read from, a directory or a Hub repository (`org/name`) downloaded once;
- `host_memory`: the process's resident memory (Linux);
- `meta`: modules built with their parameters on the meta device, for a caller that assigns them all;
- `plotting`: matplotlib figures drawn to files only, outside pyplot (the process's backend untouched);
- `lazy`: packages whose public names load on first use (this one too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_getattr

if TYPE_CHECKING:
    from .checkpoint_io import atomic_directory
    from .distributed import default_device, dist_info, init_process_group_from_env, leave_process_group_and_exit
    from .dtypes import DTYPE_NAMES, torch_dtype
    from .host_memory import status_kib
    from .launch import run_torchrun, torchrun_command
    from .lru import LRU, TensorCache
    from .plotting import figure
    from .quiet import quiet_irrelevant_warnings, quiet_transformers

# Names load on first use (PEP 562): the CLI parses its arguments (and prints --help) without importing torch.
_HOMES = {"atomic_directory": ".checkpoint_io", "default_device": ".distributed", "dist_info": ".distributed",
          "init_process_group_from_env": ".distributed", "leave_process_group_and_exit": ".distributed",
          "DTYPE_NAMES": ".dtypes", "torch_dtype": ".dtypes", "status_kib": ".host_memory",
          "run_torchrun": ".launch", "torchrun_command": ".launch", "LRU": ".lru", "TensorCache": ".lru",
          "figure": ".plotting", "quiet_irrelevant_warnings": ".quiet", "quiet_transformers": ".quiet"}
__all__ = ["DTYPE_NAMES", "LRU", "TensorCache", "atomic_directory", "default_device", "dist_info", "figure",
           "init_process_group_from_env", "leave_process_group_and_exit", "quiet_irrelevant_warnings",
           "quiet_transformers", "run_torchrun", "status_kib", "torch_dtype", "torchrun_command"]
__getattr__ = lazy_getattr(__name__, _HOMES)
