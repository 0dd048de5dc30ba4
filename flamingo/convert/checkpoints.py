"""A published checkpoint's directory and tensors, read without running pickle code and without a second copy of
the weights; models built on them without random init; a converted model's backbones written once for trained-only
checkpoints.

How a conversion stays near one copy of the weights (peak resident memory: bench/convert_memory.py): the HF models
are built with their parameters on the meta device (`meta_parameters`), the checkpoint's tensors are read one at a
time (`CheckpointTensors`), renamed and cast as they are read, and become the parameters themselves
(`assign_tensors`: `load_state_dict(assign=True)`, no copy into a built model).
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from ..model.flamingo import Flamingo, check_state_shapes
from ..processing import FlamingoProcessor
from ..runtime.checkpoint_io import atomic_directory, check_replaceable
from ..runtime.hub import METADATA, local_dir

Reader = Callable[[str, Optional[torch.dtype]], torch.Tensor]  # (name, dtype to cast to or None) -> the tensor


def checkpoint_dir(source: str, what: str, *, revision: Optional[str] = None, allow_bin: bool = True) -> str:
    """`source` if it is a directory, else the local snapshot of the Hub repository it names, with its configs,
    tokenizer files and weights: its safetensors when it has them, else (when `allow_bin`) its `.bin` files, never
    both (a 7B repository holding both would be twice the download)."""
    directory = local_dir(source, what, revision=revision, allow_patterns=[*METADATA, "*.safetensors"],
                          ignore_patterns=None)
    if not allow_bin or os.path.isdir(source) or glob.glob(os.path.join(directory, "*.safetensors")):
        return directory
    return local_dir(source, what, revision=revision, allow_patterns=[*METADATA, "*.bin"], ignore_patterns=None)


def refuse_quantized(config: dict, source: str) -> None:
    """A checkpoint saved quantized (bitsandbytes, GPTQ, AWQ, ...: `quantization_config` in its config) holds packed
    integers and scales, not the weights a conversion maps: refused by name, before any tensor is read."""
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ValueError(f"{source} was saved quantized ({method}): convert the unquantized checkpoint (quantize the "
                         "converted model with --quantize-frozen instead)")


def unreadable(path: str, error: BaseException) -> ValueError:
    """The error for a file torch cannot read weights-only: it names the file and the reason (the exception's type
    when its message is empty, as for an empty file's EOFError)."""
    return ValueError(f"cannot read {path} as a weights-only torch checkpoint: {str(error) or type(error).__name__}")


def state_dict_of(loaded: object, path: str) -> Mapping:
    """What `torch.load` read from `path`, refused unless it is a mapping (a state dict, or a dict holding one): a
    tensor or a list saved alone is no checkpoint a conversion reads."""
    if not isinstance(loaded, Mapping) or not all(isinstance(key, str) for key in loaded):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict of named tensors")
    return loaded


class MissingTensor(KeyError, ValueError):
    """A tensor a conversion needs is not in the checkpoint: a KeyError to `Mapping` code (`get`), a ValueError with a
    readable message to callers (the CLI reports those)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors by name, each read when it is asked for, in `dtype` when set (floating tensors only).
    From safetensors every `tensors[name]` is a new tensor of its own, so that a dict renaming them holds the only
    copy and a tensor the conversion drops or concatenates is freed at once; from `.bin` files (read whole) it is the
    loaded tensor. `in`, `len`, iteration and `dtype_of` read no data; `.items()` and `.values()` read every tensor.
    `where` names the checkpoint in errors: a tensor it lacks raises `MissingTensor`."""

    def __init__(self, dtypes: dict[str, torch.dtype], read: Reader, dtype: Optional[torch.dtype] = None,
                 where: str = "the checkpoint") -> None:
        self._dtypes, self._read, self.dtype, self.where = dtypes, read, dtype, where

    def _check(self, name: str) -> None:
        if name not in self._dtypes:
            raise MissingTensor(f"{self.where} has no tensor {name!r}: is it complete, and does its config describe "
                                "its tensors?")

    def __getitem__(self, name: str) -> torch.Tensor:
        self._check(name)
        cast = self.dtype if self.dtype is not None and self._dtypes[name].is_floating_point else None
        return self._read(name, cast)

    def __contains__(self, name: object) -> bool:
        return name in self._dtypes

    def __iter__(self) -> Iterator[str]:
        return iter(self._dtypes)

    def __len__(self) -> int:
        return len(self._dtypes)

    def dtype_of(self, name: str) -> torch.dtype:
        """The stored dtype of tensor `name`, without reading it."""
        self._check(name)
        return self._dtypes[name]

    def cast(self, dtype: Optional[torch.dtype]) -> "CheckpointTensors":
        """The same tensors, floating ones read in `dtype` (None: as stored)."""
        return CheckpointTensors(self._dtypes, self._read, dtype, self.where)

    @classmethod
    def of_dict(cls, state: Mapping[str, torch.Tensor], *, copy: bool, where: str = "the checkpoint"
                ) -> "CheckpointTensors":
        """Tensors already in memory; `copy` gives each reader its own (a converted model then shares nothing with an
        in-memory source model), else the reader gets the tensor itself (cast when asked)."""

        def read(name: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
            tensor = state[name].detach()
            return tensor.to(dtype=dtype or tensor.dtype, copy=copy)

        return cls({k: v.dtype for k, v in state.items()}, read, where=where)


def _safetensors(files: list[str], where: str) -> CheckpointTensors:
    from safetensors import SafetensorError, safe_open

    located: dict[str, str] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    located[name] = path
                    dtypes[name] = f.get_tensor(name).dtype  # a view of the file's mapping: no data is read
        except SafetensorError as e:
            raise ValueError(f"{path!r} is not a readable safetensors file (truncated or damaged?): {e}") from e

    def read(name: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
        # The file is opened for this tensor alone: safetensors' tensors are views of one mapping of the file per
        # open, which stays resident as long as any view lives. Copied out, the mapping goes when this returns, and
        # the model owns its memory (the checkpoint may be moved or rewritten while it lives).
        with safe_open(located[name], framework="pt") as f:
            mapped = f.get_tensor(name)
        return mapped.to(dtype=dtype or mapped.dtype, copy=True)

    return CheckpointTensors(dtypes, read, where=where)


def _torch_files(files: list[str], where: str) -> CheckpointTensors:
    """`.bin` files read weights-only, whole: the tensors a conversion takes become its parameters (no copy)."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise unreadable(f, e) from e
        state.update(state_dict_of(loaded, f))
    return CheckpointTensors.of_dict(state, copy=False, where=where)


def open_tensors(directory: str, *, allow_bin: bool = True) -> CheckpointTensors:
    """Every tensor of a checkpoint directory: its safetensors files (read a tensor at a time), else (when
    `allow_bin`) its `.bin` files read weights-only."""
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    where = f"the checkpoint {directory!r}"
    if files:
        return _safetensors(files, where)
    if not allow_bin:
        raise ValueError(f"no *.safetensors in {directory!r}: this checkpoint is read from safetensors only (no "
                         "pickle)")
    files = sorted(glob.glob(os.path.join(directory, "*.bin")))
    if not files:
        raise ValueError(f"no *.safetensors or *.bin weights in {directory!r}")
    return _torch_files(files, where)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside (and floating tensors made without a dtype) are `dtype`: parts that a conversion builds
    at random and then loads are made in the dtype they end in, not in float32 to be cast after. Sets torch's
    default dtype for the process while inside."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def assign_tensors(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """`model` (built under `meta_parameters`) with the tensors of `state` as its parameters and buffers: each cast
    to the dtype the model gave it (what `load_state_dict`'s copy would do), no copy otherwise. Its HF parts tie
    their weights again, and parameters that do not tie but share a tensor (a `.bin` file saving one tensor under
    two names) get one each. Returns `load_state_dict`'s (missing keys, unexpected keys); `meta_tensors` lists
    what the state left unset."""
    targets = model.state_dict(keep_vars=True)
    cast = {k: v.to(targets[k].dtype) if k in targets and v.dtype != targets[k].dtype else v for k, v in state.items()}
    result = model.load_state_dict(cast, strict=False, assign=True)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.tie_weights()
    owners: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type == "meta" or param.numel() == 0:
                continue
            pointer = param.untyped_storage().data_ptr()
            if owners.setdefault(pointer, param) is not param:
                module._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
    return list(result.missing_keys), list(result.unexpected_keys)


def assign_all(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """`assign_tensors`, refusing a state of tensors of other shapes than the model's (`check_state_shapes`), that
    names a tensor the model lacks or leaves one without its tensor (a weight tied to one the state gives has it)."""
    check_state_shapes(model, state, what, "is it the checkpoint of this model, and its config the one it was "
                       "trained with?")
    missing, unexpected = assign_tensors(model, state)
    params = dict(model.named_parameters(remove_duplicate=False))
    given = {id(params[k]) for k in state if k in params}
    missing = [k for k in missing if not (k in params and id(params[k]) in given)]
    unset = meta_tensors(model)
    if missing or unexpected or unset:
        raise ValueError(f"{what} does not match {type(model).__name__}: missing {(missing or unset)[:3]}, "
                         f"unexpected {unexpected[:3]}")


def meta_tensors(model: nn.Module) -> list[str]:
    """The names of `model`'s parameters and buffers still on the meta device (given no tensor)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in named if tensor.device.type == "meta"]


BACKBONES = ("lm", "vision")  # what `write_backbones` writes, and all it writes


def is_backbones_dir(directory: str) -> bool:
    """Whether `directory` is an earlier `write_backbones` (its `vision/` and `lm/`, nothing else)."""
    return sorted(os.listdir(directory)) == list(BACKBONES)


def check_backbones_dir(directory: str) -> None:
    """Refuse a backbones directory that holds files and is not an earlier `write_backbones` (it is replaced whole)."""
    check_replaceable(directory, "lm/config.json", "a converted model's backbones (vision/, lm/)", is_backbones_dir)


def write_backbones(model: Flamingo, processor: FlamingoProcessor, directory: str) -> None:
    """Save a converted model's vision tower and LM as HF directories (`directory/vision`, `directory/lm`) and point
    its config at them, so that `save_pretrained(..., trained_only=True)` checkpoints can share them; the Hub commits
    it recorded (`vision_revision` / `lm_revision`) are cleared: a local copy has no revisions, and a commit kept
    beside its path would pin whatever Hub name the reference is later pointed back at. `directory` is new, empty or
    an earlier such write (`check_backbones_dir`), replaced whole, atomically."""
    with atomic_directory(directory, "lm/config.json", "a converted model's backbones (vision/, lm/)",
                          is_backbones_dir) as tmp:
        model.vision.save_pretrained(os.path.join(tmp, "vision"))
        processor.image_processor.save_pretrained(os.path.join(tmp, "vision"))
        model.lm.save_pretrained(os.path.join(tmp, "lm"))
        processor.tokenizer.save_pretrained(os.path.join(tmp, "lm"))
    vision, lm = os.path.join(directory, "vision"), os.path.join(directory, "lm")
    model.config.vision_name_or_path, model.config.lm_name_or_path = os.path.abspath(vision), os.path.abspath(lm)
    model.config.vision_revision = model.config.lm_revision = None
