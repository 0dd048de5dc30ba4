"""Training checkpoints that lose nothing, written atomically, read without pickle.

`checkpoints/step_00000010/` holds:
- `trained.safetensors`: the trained parameters (by `Flamingo.named_parameters()` name);
- `optimizer.safetensors`: the optimizer's and the scheduler's state dicts, their tensors as plain tensors (8-bit
  optimizer states as their codes and scales) and their structure as JSON in the file's metadata (state_codec.py).
  One process and DDP write `optimizer.state_dict()` (parameters by index), FSDP its full state by parameter name
  (`{"fsdp_full": ...}`); either loads into the other layout;
- `rng.safetensors`: every rank's torch CPU generator state and its own GPU's (`rank{r}/torch_cpu`,
  `rank{r}/torch_cuda`);
- `state.json`: step, world size, fault counters, every rank's numpy / Python RNG states and data loaders'
  positions, and what a resume must match or report (`optim.kind` and settings, `model.flamingo.lm_lora`:
  `check_resumable`; the frozen backbones' storage: the trainer's `_log_frozen_storage`).
Checkpoints written before `optimizer.safetensors` (an `optimizer.pt` read with `weights_only=True`, the scheduler in
state.json) or before per-rank RNG states (rank 0's alone, unprefixed) still load.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.flamingo import check_state_shapes
from ..model.lora import FUNCTION_KEYS, same_adapters
from ..runtime.checkpoint_io import atomic_directory, unfinished_write
from . import state_codec

CHECKPOINT_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
_STEP_RE = re.compile(r"^step_(\d{8})$")

log = logging.getLogger(__name__)


RngState = tuple[dict[str, torch.Tensor], dict[str, Any]]  # (torch generator states, numpy / Python states)


def rng_state(device: Optional[torch.device] = None) -> RngState:
    """This process's generator states: torch's CPU one, `device`'s CUDA one (a rank's own GPU only: the others are
    other ranks'), numpy's and Python's."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
                     "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], other: dict[str, Any],
                  device: Optional[torch.device] = None) -> None:
    """Restore `rng_state`'s states; the CUDA one on `device` (checkpoints that saved every GPU's, `torch_cuda_{i}`:
    the device's own)."""
    torch.set_rng_state(tensors["torch_cpu"])
    if device is not None and device.type == "cuda":
        cuda = tensors.get("torch_cuda", tensors.get(f"torch_cuda_{device.index or 0}"))
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    kind, keys, pos, has_gauss, gauss = other["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = other["python"]
    random.setstate((version, tuple(internal), gauss_next))


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch's generators (CPU and CUDA) for rank `rank`'s training draws (dropout): `seed + rank`, so that
    ranks draw other masks. Called once the model is built, whose initial weights every rank draws from `seed`."""
    torch.manual_seed(seed + rank)


def saved_world_size(state: dict[str, Any]) -> int:
    """How many processes wrote a checkpoint (state.json's `world_size`, else its per-rank data positions)."""
    data = state.get("data")
    return int(state.get("world_size", len(data) if isinstance(data, list) else 1))


def rank_entry(saved: Any, rank: int) -> Any:
    """Rank `rank`'s entry of a per-rank list a checkpoint holds (data positions, RNG states): entry `rank`; entry 0
    for a rank the checkpoint's run did not have (resumed by more processes); `saved` itself when it is not a list
    (one process wrote it)."""
    if not isinstance(saved, list):
        return saved
    if not saved:
        raise ValueError("the checkpoint holds no per-rank state")
    return saved[rank] if rank < len(saved) else saved[0]


def restore_rng(path: str, state: dict[str, Any], rank: int, seed: int, device: Optional[torch.device] = None
                ) -> bool:
    """Restore rank `rank`'s generator states from checkpoint `path` (state.json's content `state`). A rank the
    checkpoint's run did not have is seeded as a fresh run's rank is (`seed_rank`): returns False then. A checkpoint
    written before per-rank states holds rank 0's alone."""
    tensors = _tensors(path, "rng.safetensors")
    others = state["rng"]
    if isinstance(others, dict):  # rank 0's, unprefixed keys
        tensors, others = {f"rank0/{k}": v for k, v in tensors.items()}, [others]
    if rank >= len(others):
        seed_rank(seed, rank)
        return False
    prefix = f"rank{rank}/"
    set_rng_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, others[rank], device)
    return True


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := _STEP_RE.match(name))]
    return sorted(p for p in found if os.path.isfile(os.path.join(p[1], "state.json")))


def remove_stale_writes(output_dir: str) -> int:
    """Remove what killed checkpoint writes left in `checkpoints/` (call it before training, on rank 0 only: no write
    is under way): every `step_*.tmp-<pid>` (a checkpoint being filled), and every `step_*.old-<pid>` whose checkpoint
    exists (one being replaced); an `.old-` without its checkpoint is the only copy of that step and stays. Returns
    how many were removed."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return 0
    removed = 0
    for name in sorted(os.listdir(root)):
        write = unfinished_write(name)
        if write is None or not _STEP_RE.match(write[0]):
            continue
        if write[1] == "old" and not os.path.isfile(os.path.join(root, write[0], "state.json")):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed += 1
    if removed:
        log.info("%s: removed %d unfinished checkpoint write(s) of an earlier run", root, removed)
    return removed


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _full_state_options() -> Any:
    """Full (unsharded) CPU state of the trained parameters only, for FSDP checkpoints."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 has sharded the model's parameters (DTensors)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def gather_trained_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name, as full CPU tensors. Collective under FSDP: call on every rank (ranks other
    than 0 get an empty dict)."""
    if not is_sharded(model):
        return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    # by name: a tied alias of a frozen table (an LM's lm_head.weight tied to its input embedding) is not one of the
    # model's named parameters, so `ignore_frozen_params` cannot tell that it is frozen and keeps it
    return {k: v.contiguous() for k, v in get_model_state_dict(model, options=_full_state_options()).items()
            if k in trained}


def gather_all_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer by state-dict name, frozen ones included, as full CPU tensors: what an
    unsharded copy of a model whose frozen weights FSDP shards needs. Collective: call on every rank (ranks other
    than 0 get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.contiguous() for k, v in get_model_state_dict(model, options=options).items()}


def gather_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """(trained parameters by name, optimizer state) as full CPU tensors; collective under FSDP."""
    trained = gather_trained_parameters(model)
    if not is_sharded(model):
        return trained, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return trained, {"fsdp_full": get_optimizer_state_dict(model, optimizer, options=_full_state_options())}


def save_checkpoint(output_dir: str, step: int, trained: dict[str, torch.Tensor], optimizer_state: Any,
                    scheduler: Any, state: dict[str, Any], keep_last: int, rng: Optional[list[RngState]] = None
                    ) -> str:
    """Write `checkpoints/step_{step}` atomically and keep only the last `keep_last` checkpoints (0: all of them;
    rank 0 only). rng: every rank's `rng_state`, by rank (default: this process's)."""
    path = os.path.join(output_dir, CHECKPOINT_DIR, f"step_{step:08d}")
    rng = rng if rng is not None else [rng_state()]
    rng_tensors = {f"rank{r}/{k}": v for r, (tensors, _) in enumerate(rng) for k, v in tensors.items()}
    with atomic_directory(path, "state.json", "a training checkpoint") as tmp:
        save_file(trained, os.path.join(tmp, "trained.safetensors"))
        optimizer_tree, optimizer_tensors = state_codec.encode(optimizer_state, "optimizer")
        scheduler_tree, scheduler_tensors = state_codec.encode(scheduler.state_dict(), "scheduler")
        save_file({**optimizer_tensors, **scheduler_tensors}, os.path.join(tmp, OPTIMIZER_FILE),
                  metadata={"optimizer": json.dumps(optimizer_tree), "scheduler": json.dumps(scheduler_tree)})
        save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"step": step, "rng": [other for _, other in rng], **state}, f)
    for _, old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _damaged(path: str, name: str, e: Exception) -> ValueError:
    return ValueError(f"{os.path.join(path, name)!r} cannot be read ({e}): the checkpoint is damaged (a copy cut off, "
                      "or a crash before the disk held its files?); move the directory aside to resume from the "
                      "checkpoint before it")


def _tensors(path: str, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; a damaged one is a ValueError naming it (safetensors' own error names none)."""
    try:
        return load_file(os.path.join(path, name))
    except SafetensorError as e:
        raise _damaged(path, name, e) from e


def read_state(path: str) -> dict[str, Any]:
    """A checkpoint's state.json; a damaged one is a ValueError naming it."""
    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, "state.json", e) from e
    if not isinstance(state, dict):
        raise _damaged(path, "state.json", ValueError("not a JSON object"))
    step = state.get("step", 0)  # (a missing one is left to the reads that need it)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _damaged(path, "state.json", ValueError(f"its step is {step!r}, not a count"))
    return state


def _optimizer_and_scheduler_state(path: str, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    file = os.path.join(path, OPTIMIZER_FILE)
    if not os.path.isfile(file):  # written before optimizer.safetensors
        return torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True), state["scheduler"]
    tensors = _tensors(path, OPTIMIZER_FILE)
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    return (state_codec.decode(json.loads(metadata["optimizer"]), tensors),
            state_codec.decode(json.loads(metadata["scheduler"]), tensors))


def check_lora_resumable(path: str, saved: Optional[dict[str, Any]], now: Optional[dict[str, Any]]) -> None:
    """Refuse a checkpoint written with another `model.flamingo.lm_lora` r, alpha or target_modules: its adapters
    would load into other layers or under another scale (alpha / r), so the model's function would jump at the
    resume point. saved: state.json's `lm_lora`; now: the model's."""
    if (saved is None) != (now is None) or (saved is not None and now is not None and not same_adapters(saved, now)):
        raise ValueError(f"checkpoint {path} was written with model.flamingo.lm_lora={saved}; the config says {now}: "
                         f"its {'/'.join(FUNCTION_KEYS)} must stay (dropout may change); resume with the "
                         "checkpoint's lm_lora, or start a new output_dir")


def check_resumable(path: str, state: dict[str, Any], model: nn.Module, trained: dict[str, torch.Tensor],
                    optim_kind: Optional[str]) -> None:
    """A checkpoint written by a run of another optimizer kind, another `model.flamingo.lm_lora` (state.json's
    `lm_lora`, compared with `model.config.lm_lora`; checkpoints without it are checked by their parameters alone)
    or other trained parameters is refused here with the option named, not inside torch or torchao."""
    saved_kind = state.get("optim_kind")
    if optim_kind is not None and saved_kind is not None and saved_kind != optim_kind:
        raise ValueError(f"checkpoint {path} was written with optim.kind={saved_kind}; the config says {optim_kind}: "
                         "their states differ (resume with the same kind, or start a new output_dir)")
    config = getattr(model, "config", None)
    if "lm_lora" in state and hasattr(config, "lm_lora"):
        check_lora_resumable(path, state["lm_lora"], config.lm_lora)
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not is_sharded(model):
        unknown = sorted(set(trained) - set(ours))
        if unknown:
            raise ValueError(f"checkpoint {path} holds trained parameters this model does not train {unknown[:5]}: "
                             "was it written with another model.flamingo (lm_lora, ...)?")
        check_state_shapes(ours, trained, f"checkpoint {path}",
                           "was it written with another model.flamingo (lm_lora's r, ...)?")


def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The optimizer's parameters by name, group by group, in its order (the order of `optimizer.state_dict()`'s
    indices)."""
    names = {p: n for n, p in model.named_parameters()}
    return [[names[p] for p in group["params"]] for group in optimizer.param_groups]


def _check_groups(path: str, saved: list[dict[str, Any]], names: list[list[str]]) -> None:
    if len(saved) != len(names):  # torch's own error would not say why
        raise ValueError(f"checkpoint {path} has {len(saved)} optimizer parameter groups, this run {len(names)}: was "
                         "optim.attn_gate_lr_mult set or unset since? (it gives the attention gates a group of their "
                         "own) Resume with it as it was, or start a new output_dir")
    for i, (group, ours) in enumerate(zip(saved, names)):
        if len(group["params"]) != len(ours):
            raise ValueError(f"checkpoint {path} has {len(group['params'])} parameters in optimizer group {i}, this "
                             f"run {len(ours)}: was it written with another model.flamingo?")


def _by_name(state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """An `optimizer.state_dict()` (parameters by index, in group order) keyed by parameter name, the form FSDP's
    full state has (`get_optimizer_state_dict`)."""
    name_of = {i: name for group, ours in zip(state["param_groups"], names) for i, name in zip(group["params"], ours)}
    return {"state": {name_of[i]: v for i, v in state["state"].items()},
            "param_groups": [{**group, "params": ours} for group, ours in zip(state["param_groups"], names)]}


def _by_index(path: str, state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """FSDP's full optimizer state (parameters by name) as `optimizer.load_state_dict` takes it for this run's
    optimizer (parameters by index in its group order)."""
    index = {name: i for i, name in enumerate(n for ours in names for n in ours)}
    for i, (group, ours) in enumerate(zip(state["param_groups"], names)):
        if set(group["params"]) != set(ours):
            other = sorted(set(group["params"]) ^ set(ours))
            raise ValueError(f"checkpoint {path}: optimizer group {i} holds other parameters than this run's "
                             f"({other[:5]}): was it written with another model.flamingo?")
    return {"state": {index[name]: v for name, v in state["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in ours]}
                             for group, ours in zip(state["param_groups"], names)]}


def _check_layout(path: str, saved_sharded: bool, sharded: bool, optim_kind: Optional[str]) -> None:
    """8-bit optimizer states do not move between FSDP and one process / DDP: under FSDP each rank quantizes its
    shard (a shard too small for the 256-value blocks keeps fp32 states where the whole tensor would not)."""
    if saved_sharded == sharded or optim_kind != "adamw8bit":
        return
    written = "under FSDP (train.distributed=fsdp)" if saved_sharded else "by one process or under DDP"
    how = ("under torchrun with train.distributed=fsdp" if saved_sharded
           else "with train.distributed=ddp (or one process)")
    raise ValueError(f"checkpoint {path} was written {written} with optim.kind=adamw8bit, whose 8-bit states are "
                     f"quantized per shard under FSDP and do not move between the layouts: resume it {how}, or "
                     "start a new output_dir")


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    device: torch.device, optim_kind: Optional[str] = None) -> dict[str, Any]:
    """Restore the trained weights, the optimizer and the scheduler `save_checkpoint` wrote; returns state.json's
    content (step, data positions, RNG states for `restore_rng`, ...). Every rank reads the files (they must be on
    a shared or copied file system). `optim_kind`: the config's `optim.kind`, compared with the checkpoint's
    (`check_resumable`). The optimizer state moves between layouts: FSDP writes it keyed by parameter name, one
    process and DDP by index, and either loads into the other."""
    trained = _tensors(path, "trained.safetensors")
    state = read_state(path)
    check_resumable(path, state, model, trained, optim_kind)
    optimizer_state, scheduler_state = _optimizer_and_scheduler_state(path, state)
    saved_sharded = "fsdp_full" in optimizer_state
    optimizer_state = optimizer_state["fsdp_full"] if saved_sharded else optimizer_state
    _check_layout(path, saved_sharded, is_sharded(model), state.get("optim_kind", optim_kind))
    names = _group_names(model, optimizer)
    _check_groups(path, optimizer_state["param_groups"], names)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, trained, options=options)
        if not saved_sharded:
            optimizer_state = _by_name(optimizer_state, names)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    else:
        params = dict(model.named_parameters())
        missing = {n for n, p in params.items() if p.requires_grad} - set(trained)
        if missing:
            raise ValueError(f"checkpoint {path} lacks trained parameters {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)
        if saved_sharded:
            optimizer_state = _by_index(path, optimizer_state, names)
        optimizer.load_state_dict(optimizer_state)  # moves the state onto each parameter's device
    scheduler.load_state_dict(scheduler_state)
    return state
