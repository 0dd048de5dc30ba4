"""Training checkpoints that lose nothing, written atomically, read without pickle.

`checkpoints/step_00000010/` holds:
- `trained.safetensors`: the trained parameters (by `Flamingo.named_parameters()` name);
- `optimizer.safetensors`: the optimizer's and the scheduler's state dicts, their tensors as plain tensors (8-bit
  optimizer states as their codes and scales) and their structure as JSON in the file's metadata (state_codec.py);
- `rng.safetensors`: torch CPU (and CUDA) generator states;
- `state.json`: step, fault counters, numpy / Python RNG states, the data loaders' positions, and what a resume must
  match or report (`optim.kind` and settings, `model.flamingo.lm_lora`: `check_resumable`).
Checkpoints written before `optimizer.safetensors` (an `optimizer.pt` read with `weights_only=True`, the scheduler in
state.json) still load.
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.flamingo import check_state_shapes
from ..runtime.checkpoint_io import atomic_directory, unfinished_write
from . import state_codec

CHECKPOINT_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
_STEP_RE = re.compile(r"^step_(\d{8})$")

log = logging.getLogger(__name__)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
                     "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], other: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = other["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = other["python"]
    random.setstate((version, tuple(internal), gauss_next))


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


def gather_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """(trained parameters by name, optimizer state) as full CPU tensors; collective under FSDP."""
    trained = gather_trained_parameters(model)
    if not is_sharded(model):
        return trained, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return trained, {"fsdp_full": get_optimizer_state_dict(model, optimizer, options=_full_state_options())}


def save_checkpoint(output_dir: str, step: int, trained: dict[str, torch.Tensor], optimizer_state: Any,
                    scheduler: Any, state: dict[str, Any], keep_last: int) -> str:
    """Write `checkpoints/step_{step}` atomically and keep only the last `keep_last` checkpoints (0: all of them;
    rank 0 only)."""
    path = os.path.join(output_dir, CHECKPOINT_DIR, f"step_{step:08d}")
    rng_tensors, rng_other = rng_state()
    with atomic_directory(path, "state.json", "a training checkpoint") as tmp:
        save_file(trained, os.path.join(tmp, "trained.safetensors"))
        optimizer_tree, optimizer_tensors = state_codec.encode(optimizer_state, "optimizer")
        scheduler_tree, scheduler_tensors = state_codec.encode(scheduler.state_dict(), "scheduler")
        save_file({**optimizer_tensors, **scheduler_tensors}, os.path.join(tmp, OPTIMIZER_FILE),
                  metadata={"optimizer": json.dumps(optimizer_tree), "scheduler": json.dumps(scheduler_tree)})
        save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "rng": rng_other, **state}, f)
    for _, old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _optimizer_and_scheduler_state(path: str, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    file = os.path.join(path, OPTIMIZER_FILE)
    if not os.path.isfile(file):  # written before optimizer.safetensors
        return torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True), state["scheduler"]
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    return (state_codec.decode(json.loads(metadata["optimizer"]), tensors),
            state_codec.decode(json.loads(metadata["scheduler"]), tensors))


# the lm_lora keys that set what the adapters compute (their layers, their scale alpha / r); dropout acts in training
# only, so a change of it applies from the resumed step on (the trainer logs it)
LORA_FUNCTION_KEYS = ("r", "alpha", "target_modules")


def _lora_function(spec: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The part of an `lm_lora` spec a resume must keep (target_modules as a set: their order is no change)."""
    if spec is None:
        return None
    return {k: sorted(spec[k]) if k == "target_modules" else spec[k] for k in LORA_FUNCTION_KEYS}


def check_lora_resumable(path: str, saved: Optional[dict[str, Any]], now: Optional[dict[str, Any]]) -> None:
    """Refuse a checkpoint written with another `model.flamingo.lm_lora` r, alpha or target_modules: its adapters
    would load into other layers or under another scale (alpha / r), so the model's function would jump at the
    resume point. saved: state.json's `lm_lora`; now: the model's."""
    if _lora_function(saved) != _lora_function(now):
        raise ValueError(f"checkpoint {path} was written with model.flamingo.lm_lora={saved}; the config says {now}: "
                         f"its {'/'.join(LORA_FUNCTION_KEYS)} must stay (dropout may change); resume with the "
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


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    device: torch.device, optim_kind: Optional[str] = None) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns state.json's content (step, data positions, ...).
    Every rank reads the files (they must be on a shared or copied file system). `optim_kind`: the config's
    `optim.kind`, compared with the checkpoint's (`check_resumable`)."""
    trained = load_file(os.path.join(path, "trained.safetensors"))
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    check_resumable(path, state, model, trained, optim_kind)
    optimizer_state, scheduler_state = _optimizer_and_scheduler_state(path, state)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, trained, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state["fsdp_full"], options=options)
    else:
        groups = len(optimizer_state["param_groups"])
        if groups != len(optimizer.param_groups):  # torch's own error would not say why
            raise ValueError(f"checkpoint {path} has {groups} optimizer parameter groups, this run "
                             f"{len(optimizer.param_groups)}: was optim.attn_gate_lr_mult set or unset since? (it "
                             "gives the attention gates a group of their own) Resume with it as it was, or start a "
                             "new output_dir")
        params = dict(model.named_parameters())
        missing = {n for n, p in params.items() if p.requires_grad} - set(trained)
        if missing:
            raise ValueError(f"checkpoint {path} lacks trained parameters {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)
        optimizer.load_state_dict(optimizer_state)  # moves the state onto each parameter's device
    scheduler.load_state_dict(scheduler_state)
    set_rng_state(load_file(os.path.join(path, "rng.safetensors")), state["rng"])
    return state
