"""The bottom layer: what every other layer may use and nothing above it is imported by.

- `dtypes`: the dtype names of configs and command lines (fp32, bf16, fp16);
- `distributed`: rank, world size and device from torchrun's environment, joining its process group and leaving it;
- `launch`: running a module in several processes under torchrun;
- `quiet`: silencing transformers' own progress bars and other packages' start-up warnings irrelevant to a run;
- `lru`: one bounded least-recently-used store (by count or by bytes), and the tensor cache built on it;
- `checkpoint_io`: atomic directory writes;
- `hub`: where a model is read from, a directory or a Hub repository (`org/name`) downloaded once;
- `host_memory`: the process's resident memory (Linux);
- `plotting`: matplotlib's pyplot drawing to files only.
"""

from .checkpoint_io import atomic_directory
from .distributed import default_device, dist_info, init_process_group_from_env, leave_process_group_and_exit
from .dtypes import DTYPE_NAMES, torch_dtype
from .host_memory import status_kib
from .launch import run_torchrun, torchrun_command
from .lru import LRU, TensorCache
from .plotting import pyplot
from .quiet import quiet_irrelevant_warnings, quiet_transformers

__all__ = ["DTYPE_NAMES", "LRU", "TensorCache", "atomic_directory", "default_device", "dist_info",
           "init_process_group_from_env", "leave_process_group_and_exit", "pyplot", "quiet_irrelevant_warnings",
           "quiet_transformers",
           "run_torchrun", "status_kib", "torch_dtype", "torchrun_command"]
