"""The training config: one YAML file (annotated example in configs/) + `key.sub=value` overrides."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from ..config import FlamingoConfig
from ..data.kinds import RENAMED_OPTIONS, check_stream_options, renamed_keys, resolve_options
from ..runtime.checkpoint_io import blocking_file, check_named
from ..runtime.hub import is_hub_reference

log = logging.getLogger(__name__)


def _warn_run(message: str, *args: Any) -> None:
    """A warning about the run as a whole, logged by rank 0 only: every torchrun rank parses the config."""
    from ..runtime.distributed import dist_info  # imports torch: not at module level, which the CLI reads first

    if dist_info()[0] == 0:
        log.warning(message, *args)


@dataclass
class ModelSection:
    vision: Optional[str] = None  # HF name/path of the vision tower
    lm: Optional[str] = None  # HF name/path of the causal LM
    tokenizer: Optional[str] = None  # defaults to the LM's
    # a saved Flamingo (directory or Hub repository) to start from instead of fresh blocks; or an IDEFICS, Otter or
    # published OpenFlamingo checkpoint, converted as it loads (flamingo/convert/auto.py)
    init_from: Optional[str] = None
    # the Hub branch, tag or commit init_from is read at (None: its default branch), as `--revision` for --model and
    # `vision_revision` / `lm_revision` for backbones; a commit keeps a resumed run on the same weights
    init_from_revision: Optional[str] = None
    flamingo: dict[str, Any] = field(default_factory=dict)  # FlamingoConfig fields (xattn_every, ...)


@dataclass
class DatasetSection:
    name: str
    kind: str  # "interleaved" | "pairs" | "video" | "chat" (see docs/data.md)
    path: str
    batch_size: int = 8
    loss_weight: float = 1.0  # the paper's lambda_m
    options: dict[str, Any] = field(default_factory=dict)  # passed to the dataset builder (max_tokens, ...)


@dataclass
class OptimSection:
    kind: str = "adamw"  # adamw (fp32 states) | adamw8bit (torchao's 8-bit states: 2 bytes per trained parameter)
    lr: float = 1e-4
    weight_decay: float = 0.1  # on the xattn blocks' matrices (and LoRA's) only
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: bool = False  # fused AdamW kernel; it skips non-finite steps on the device (no host sync per step)
    gate_lr_mult: float = 1.0  # learning rate of the tanh gates = lr x this (see train/optim.py)
    attn_gate_lr_mult: Optional[float] = None  # the attention gates' own multiplier (None: gate_lr_mult)
    # Step each trained parameter inside backward and free its gradient at once (train/in_backward.py): no memory for
    # all the gradients together. Needs train.grad_clip: 0, one micro-batch, one dataset per step; not DDP (FSDP works).
    in_backward: bool = False


@dataclass
class ScheduleSection:
    kind: str = "constant"  # constant | linear | cosine, after the warmup
    warmup_steps: int = 0  # linear from lr / warmup_steps to lr over these steps


@dataclass
class TrainSection:
    steps: int = 1000  # the run's last step; a resumed run goes on to it (docs/training.md, "Stopping and resuming")
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping (the norm is still logged)
    precision: str = "fp32"  # fp32 | bf16 (autocast; trained parameters keep fp32 master weights)
    frozen_dtype: Optional[str] = None  # e.g. "bf16": store the frozen backbones in bf16
    gradient_checkpointing: bool = False
    # The loss from the LM's last hidden states, the tokens' logits made in this many chunks, one at a time and again
    # in backward (model/chunked_loss.py): the (B, T, V) logits and their gradient never exist whole. 0: whole logits.
    loss_chunks: int = 8
    # torch.compile of the repeated regions (decoder layers, vision layers, xattn blocks, resampler): train/compile.py.
    # Pays off in long runs on a GPU; compiling costs minutes first (docs/training.md).
    compile: bool = False
    compile_dynamic: Optional[bool] = None  # None: torch's automatic dynamic shapes; False: a graph per shape
    # Padding buckets (train/buckets.py): text length and media per row rounded up to these multiples, so a compiled
    # step sees few shapes. 0: 8 tokens when compiling, else none; media: none. With compile_dynamic: false use
    # coarser buckets (e.g. 64): each length compiles its own graph.
    pad_tokens_multiple: int = 0
    pad_media_multiple: int = 0
    # CUDA graphs of the frozen vision tower's forward (train/tower_graphs.py): one replay instead of its kernel
    # launches, a graph per frame count rounded up to vision_graph_frames_multiple. CUDA and a frozen tower only;
    # not with FSDP sharding the tower.
    vision_cuda_graphs: bool = False
    vision_graph_frames_multiple: int = 8
    micro_batches: int = 1  # split each dataset's batch into this many micro-batches (gradient accumulation)
    # How a dataset's step loss averages its passes (micro-batches, and ranks under torchrun): tokens = the mean over
    # all their labelled tokens, as one batch would give (trainer.py `_token_shares`); passes = the mean of the
    # passes' means (each micro-batch and rank counts the same, whatever its tokens)
    loss_average: str = "tokens"
    mixture: str = "accumulate"  # accumulate: one batch of every dataset per step (paper) | sample: one, by lambda
    seed: int = 0
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard entries (optim.fused: the loop's only host syncs)
    progress: bool = True  # a tqdm bar on rank 0
    save_every: int = 500  # steps between checkpoints; 0: at the end only (and when stopped by a signal)
    eval_every: int = 0  # steps between validation losses (the `validation` datasets); 0: at the end only
    eval_batches: int = 0  # batches of each validation dataset per evaluation and rank, the same each time; 0: all
    keep_last: int = 3  # checkpoints kept, the latest ones; 0: all of them
    max_nonfinite: int = 5  # abort after this many non-finite losses in a row
    num_workers: int = 0
    # MiB of frozen vision-tower features kept by frame content (model/feature_cache.py): for small datasets read for
    # many epochs; 0 = off. Needs model.flamingo.freeze_vision. Also read as cache_vision_features_mb (RENAMED_KEYS).
    cache_vision_features_mib: float = 0.0
    output_dir: str = "runs/flamingo"
    device: Optional[str] = None  # default: cuda:LOCAL_RANK if available, else cpu
    distributed: str = "ddp"  # ddp | fsdp (used under torchrun)
    fsdp_frozen: str = "shard"  # fsdp: shard the frozen backbones too, or replicate them (train/parallel.py)
    save_trained_only: Optional[bool] = None  # final model: trained weights only (default when backbones are named)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: list[DatasetSection] = field(default_factory=list)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    # held-out datasets (the `data` schema; loss_weight unused; shuffle off and the last partial batch kept unless
    # set): their loss every train.eval_every steps and at the end (train/validation.py)
    validation: list[DatasetSection] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelSection, "optim": OptimSection, "schedule": ScheduleSection, "train": TrainSection}
# keys read under an earlier name (MiB spelled _mb), per section: the new name -> the old one (a config or a run's
# train_config.json written with the old name still loads, warned; both names given are refused)
RENAMED_KEYS = {"train": {"cache_vision_features_mib": "cache_vision_features_mb"}}
# each renamed key's (section key or dataset option) other spelling
OTHER_SPELLING = {a: b for new, old in {**RENAMED_KEYS["train"], **RENAMED_OPTIONS}.items()
                  for a, b in ((new, old), (old, new))}


def _build(cls: type, values: Any, where: str) -> Any:
    """A section (or dataset entry) from its mapping: unknown keys, missing required ones and values of the wrong
    shape are refused naming `where`, never a TypeError from the dataclass."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping (`key: value` lines), got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown keys in {where}: {sorted(unknown, key=str)} (known: {sorted(known)})")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise ValueError(f"{where} needs {', '.join(missing)} (required: {', '.join(required)})")
    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(cls)}
    return cls(**{k: _typed(v, types[k], f"{where}.{k}") for k, v in values.items()})


_SCALAR_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,)}
_SCALAR_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false"}


# the values YAML reads from unquoted text that looks like them
_YAML_READS: dict[type, str] = {bool: "a flag", int: "an integer", float: "a number", datetime.date: "a date",
                                datetime.datetime: "a date and time"}


def _typed(value: Any, annotation: str, where: str) -> Any:
    """A number, flag or string field's value, checked here so that a wrong one (`train.steps=abc`, `optim.lr=nan`,
    `train.output_dir=42`) is refused by name, not met deep inside the run. Floats YAML 1.1 leaves as strings
    (`3e-4`) are read; a whole float is an int (`1e3`); a float field must be finite; a string field must be one (YAML
    reads `42` as a number and YYYY-MM-DD as a date: never turned back into text, which could differ from what was
    written, e.g. `010` is 8); a mapping field (`options`) must be one. Other structured fields pass as they are."""
    optional = annotation.startswith("Optional[")
    base = annotation[len("Optional["):-1] if optional else annotation
    if base.startswith("dict[") and not isinstance(value, (dict, type(None))):  # `options: [max_tokens, 32]`
        raise ValueError(f"{where} must be a mapping (`key: value` lines), got {value!r}")
    if optional and value is None:
        return value
    if base == "str":
        if not isinstance(value, str):
            read_as = _YAML_READS.get(type(value))
            # a number's text need not be what was written (`1.10` reads as 1.1, `010` as 8, `12:30` as 750), nor a
            # date and time's: only a date (YYYY-MM-DD) reads back as written
            exact = isinstance(value, datetime.date) and not isinstance(value, datetime.datetime)
            example = f", \"{value}\"," if exact else " as written"
            raise ValueError(f"{where} must be a string{' or null' if optional else ''}, got {value!r}"
                             + (f" (YAML reads it as {read_as}: quote it{example} to keep it text)" if read_as else ""))
        return value
    if base not in _SCALAR_TYPES:
        return value
    if base in ("float", "int") and isinstance(value, str):  # a quoted number (`train.steps="20"`) is still one
        try:
            value = _scalar(value)
        except ValueError:  # not even YAML: refused below as no number
            pass
    if base == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) != (base == "bool") or not isinstance(value, _SCALAR_TYPES[base]):
        raise ValueError(f"{where} must be {_SCALAR_NAMES[base]}{' or null' if optional else ''}, got {value!r}")
    if base == "float" and not math.isfinite(value):  # `optim.lr=inf` would start a run (and write Infinity)
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.steps=20`, `optim.lr=3e-4`, `data.0.batch_size=4`: values are parsed as YAML scalars. A key through a
    value that is no section, or a list index out of range, is refused naming the override."""
    _check_top_level(raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node: Any = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, dict) and node.get(part) is None:  # absent, or an empty section (`train:`)
                node[part] = {}
            node = node[_index(node, part, key)] if isinstance(node, list) else node[part]
            if not isinstance(node, (dict, list)):
                raise ValueError(f"override {key}: {'.'.join(parts[:depth + 1])} is {node!r}, not a section or list")
        last = parts[-1]
        try:
            parsed = _scalar(value)
        except ValueError as e:
            raise ValueError(f"override {item!r}: {e}; quote text: '{key}=\"...\"'") from None
        if isinstance(node, list):
            node[_index(node, last, key)] = parsed
        else:
            node.pop(OTHER_SPELLING.get(last), None)  # replaces the file's value under a renamed key's other name
            node[last] = parsed
    return raw


def _index(node: list, part: str, key: str) -> int:
    """`part` of override `key` as an index of the list `node` (`data.1.batch_size`), refused by name if it is none."""
    if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"override {key}: {part!r} is not an index of a list of {len(node)} entries"
                         + (f" (0 to {len(node) - 1})" if node else ""))
    return int(part)


# what PyYAML's tag constructors raise on text the tag does not fit, besides YAMLError: `!!int abc` ValueError,
# `!!bool maybe` KeyError, an empty `!!int` IndexError, `!!timestamp abc` AttributeError
TAG_ERRORS = (ValueError, KeyError, IndexError, AttributeError, TypeError)


def _scalar(text: str) -> Any:
    """YAML scalar, plus floats YAML 1.1 leaves as strings (`3e-4`) when plain: a quoted (`"42"`, `'7'`) or tagged
    (`!!str 2024`) one stays text, as quoting and the tag ask; `!!int`/`!!float` read as YAML says. Text YAML cannot
    read (`[`, `@x`, `!!int abc`) is a ValueError saying why."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"the value {text!r} is not valid YAML ({_yaml_problem(e)})") from None
    except TAG_ERRORS:  # a tag's constructor refusing its text (`!!int abc`): Python's message names neither
        raise ValueError(f"the value {text!r} is not what its YAML tag says") from None
    if isinstance(value, str) and text.strip()[:1] not in ("'", '"', "!"):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_TOP_LEVEL = ("model", "data", "optim", "schedule", "train", "validation")


def _check_top_level(raw: Any) -> None:
    if not isinstance(raw, dict):  # the YAML file is a list or a scalar
        raise ValueError(f"the config must be a mapping of sections ({', '.join(_TOP_LEVEL)}), got {raw!r}")


def _expanded(value: Any) -> Any:
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def _expand_home(config: TrainConfig) -> None:
    """`~` in the path-valued fields, as the datasets' paths and a shell expand it (a YAML value is no shell word:
    `train.output_dir: ~/runs/x` wrote the run under a directory named `~` in the working directory)."""
    for key in ("vision", "lm", "tokenizer", "init_from"):  # (a Hub name never starts with `~`)
        setattr(config.model, key, _expanded(getattr(config.model, key)))
    config.train.output_dir = _expanded(config.train.output_dir)
    for dataset in config.data + config.validation:
        for key in ("image_dir", "remote_cache_dir"):
            if isinstance(dataset.options, dict) and key in dataset.options:
                dataset.options[key] = _expanded(dataset.options[key])


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    _check_top_level(raw)
    unknown = set(raw) - set(_TOP_LEVEL)
    if unknown:
        raise ValueError(f"unknown top-level config keys: {sorted(unknown, key=str)}")
    sections = {name: _build(cls, _renamed(raw.get(name) or {}, RENAMED_KEYS.get(name, {}), f"{name}."), name)
                for name, cls in _SECTIONS.items()}
    data = _datasets(raw, "data")
    if not data:
        raise ValueError("the config lists no datasets under `data`")
    validation = _datasets(raw, "validation")
    names = [d.name for d in validation]
    if len(set(names)) != len(names):
        raise ValueError(f"validation dataset names must be unique, got {names}")
    config = TrainConfig(data=data, validation=validation, **sections)
    _expand_home(config)
    # each count's least value, and what its 0 means where 0 is allowed
    for key, least, zero in (("steps", 1, ""), ("log_every", 1, ""), ("micro_batches", 1, ""), ("max_nonfinite", 1, ""),
                             ("num_workers", 0, ""), ("save_every", 0, " (0: at the end only)"),
                             ("eval_every", 0, " (0: at the end only)"), ("eval_batches", 0, " (0: every batch)"),
                             ("keep_last", 0, " (0: keep every checkpoint)")):
        if getattr(config.train, key) < least:
            raise ValueError(f"train.{key} must be >= {least}{zero}, got {getattr(config.train, key)}")
    _check_model(config.model)
    _check_optim_and_schedule(config)
    for where, datasets in (("data", data), ("validation", validation)):
        for i, d in enumerate(datasets):
            if not math.isfinite(d.loss_weight) or d.loss_weight < 0:  # a number already (`_typed`)
                raise ValueError(f"{where}[{i}].loss_weight must be a finite number >= 0, got {d.loss_weight!r}")
    check_data_weights(config)
    if not validation and (config.train.eval_every or config.train.eval_batches):
        _warn_run("train.eval_every / train.eval_batches are set but the config lists no `validation` datasets: "
                  "no validation loss is computed")
    _check_choices(config.train)
    check_output_dir(config.train.output_dir)
    if config.train.device:  # usable here, before any backbone or dataset loads (null: cuda:LOCAL_RANK, else cpu)
        from ..runtime.device import check_device  # imports torch: only when a device is named

        check_device(config.train.device, "train.device")
    if config.optim.kind == "adamw8bit" and config.optim.fused:
        raise ValueError("optim.fused is torch's fused AdamW kernel: it does not apply to optim.kind=adamw8bit")
    frozen = config.train.frozen_dtype
    if frozen is not None and frozen not in ("fp32", "bf16"):
        raise ValueError(f"train.frozen_dtype must be bf16, fp32 or null, got {frozen!r} (fp16 frozen weights under "
                         "bf16 autocast have no kernel on the CPU and lose range on a GPU)")
    if frozen == "bf16" and config.train.precision != "bf16":
        raise ValueError("train.frozen_dtype: bf16 stores the frozen backbones in bf16; their activations meet the "
                         "float32 trained blocks only under autocast: set train.precision: bf16 (or frozen_dtype: "
                         "null)")
    if config.train.grad_clip < 0:
        raise ValueError(f"train.grad_clip must be >= 0 (0: no clipping), got {config.train.grad_clip}")
    check_in_backward(config)
    if config.train.compile and config.train.gradient_checkpointing:
        raise ValueError("train.compile and train.gradient_checkpointing cannot be combined (HF's checkpointing runs "
                         "inside the compiled layers with a context function torch.compile cannot trace): pick one")
    if config.train.loss_chunks < 0:
        raise ValueError(f"train.loss_chunks must be >= 0 (0: the whole logits), got {config.train.loss_chunks}")
    if config.train.pad_tokens_multiple < 0 or config.train.pad_media_multiple < 0:
        raise ValueError("train.pad_tokens_multiple and train.pad_media_multiple must be >= 0 (0: default)")
    if config.train.vision_graph_frames_multiple < 1:
        raise ValueError(f"train.vision_graph_frames_multiple must be >= 1, got "
                         f"{config.train.vision_graph_frames_multiple}")
    if not 0 <= config.train.cache_vision_features_mib < math.inf:  # NaN fails too
        raise ValueError(f"train.cache_vision_features_mib must be a finite number >= 0 (0: off), got "
                         f"{config.train.cache_vision_features_mib}")
    packed = [d.name for d in data if int((d.options or {}).get("pack_tokens") or 0) > 0]
    if packed and config.train.micro_batches > 1:
        raise ValueError(f"datasets {packed} pack their samples (pack_tokens), so their batches have a varying number "
                         "of rows, which train.micro_batches > 1 cannot split evenly: use one or the other")
    # checked here, not at the first batch that does not split: a partial last batch (drop_last false) would stop
    # the run at the end of its first epoch
    micro = config.train.micro_batches
    uneven = [d.name for d in data
              if micro > 1 and (d.batch_size % micro or not (d.options or {}).get("drop_last", True))]
    if uneven:
        raise ValueError(f"datasets {uneven} have batches that train.micro_batches={micro} cannot split evenly: each "
                         "batch_size must be a multiple of it, with drop_last true (no partial last batch)")
    return config


def _renamed(values: Any, renames: dict[str, str], where: str) -> Any:
    """A mapping with its earlier key names read as the current ones (`renamed_keys`); anything else as it is, for
    `_build` to refuse by name."""
    return renamed_keys(values, renames, where) if isinstance(values, dict) and renames else values


def _datasets(raw: dict[str, Any], key: str) -> list[DatasetSection]:
    """The `data` or `validation` list, each entry a mapping with name, kind and path (refused by `key[i]` if not).
    A validation entry's options default to shuffle off and the last partial batch kept."""
    entries = raw.get(key) or []
    if not isinstance(entries, list):
        raise ValueError(f"{key} must be a list of datasets (`- name: ...` entries), got {entries!r}")
    datasets = []
    for i, entry in enumerate(entries):
        options = (entry.get("options") or {}) if isinstance(entry, dict) else None
        if isinstance(options, dict) and set(options) & set(RENAMED_OPTIONS.values()):
            options = _renamed(options, RENAMED_OPTIONS, f"{key}[{i}] option ")  # kept under the current names
            entry = {**entry, "options": options}
        if key == "validation" and isinstance(options, dict):
            entry = {**entry, "options": {"shuffle": False, "drop_last": False, **options}}
        # a path that is no text (`path: null` would be read as `None`), said before `_build`'s type checks; a missing
        # one is named with the other required keys by `_build`
        path = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and "path" in entry and not (isinstance(path, str) and path.strip()):
            raise ValueError(f"{key}[{i}] ({entry.get('name')!r}) needs a path (a file, directory, glob or brace "
                             f"pattern; docs/data.md), got {path!r}: set it in the config or as {key}.{i}.path=...")
        section = _build(DatasetSection, entry, f"{key}[{i}]")
        try:  # the kind and its options, here rather than once the backbones have loaded (data/kinds.py: no torch)
            check_stream_options(section.name, resolve_options(section.kind, section.options))
        except ValueError as e:
            raise ValueError(f"{key}[{i}] ({section.name!r}): {e}") from None
        datasets.append(section)
    return datasets


def check_output_dir(output_dir: str) -> None:
    """train.output_dir names a directory that is or can be made: not empty (the working directory), not a file nor
    a path through one (refused here, not by `os.makedirs` once the backbones have loaded). One that exists is
    written into (checkpoints/, final/, metrics.jsonl), nothing else in it touched."""
    check_named(output_dir, "train.output_dir")
    path = blocking_file(output_dir)
    if path is not None:
        what = "is a file" if path == os.path.abspath(output_dir) else f"goes through the file {path!r}"
        raise ValueError(f"train.output_dir {output_dir!r} {what}: name a directory (new or existing) for the "
                         "run's checkpoints and final model")


def _check_choices(train: TrainSection) -> None:
    """The train section's named choices, each refused by name when misspelled (`distributed: fdsp` would run DDP)."""
    for key, choices in (("mixture", ("accumulate", "sample")), ("precision", ("fp32", "bf16")),
                         ("loss_average", ("tokens", "passes")), ("distributed", ("ddp", "fsdp")),
                         ("fsdp_frozen", ("shard", "replicate"))):
        if getattr(train, key) not in choices:
            raise ValueError(f"train.{key} must be {' or '.join(choices)}, got {getattr(train, key)!r}")


def _check_model(model: ModelSection) -> None:
    """model.flamingo holds FlamingoConfig fields only: a misspelled one is refused here, not after the backbones
    have loaded; with model.init_from, the options that build a new model are refused (`check_init_from`)."""
    options = model.flamingo
    if not isinstance(options, dict):
        raise ValueError(f"model.flamingo must be a mapping of FlamingoConfig fields (flamingo/config.py), got "
                         f"{options!r}")
    known = {f.name for f in dataclasses.fields(FlamingoConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown keys in model.flamingo: {unknown} (FlamingoConfig fields, flamingo/config.py: "
                         f"{sorted(known)})")
    check_init_from(model)
    check_trainable_quantization(options.get("quantize_frozen", "none"), "model.flamingo.quantize_frozen")


INIT_FROM_OPTIONS = ("quantize_frozen", "lm_lora")  # model.flamingo options a run from model.init_from may set


def check_init_from(model: ModelSection) -> None:
    """With model.init_from the model is the one it names, backbones, tokenizer and blocks: model.vision, model.lm,
    model.tokenizer and the model.flamingo options that shape a new model would go unused, so they are refused,
    never ignored, with the overrides that clear them. The options that apply to a trained model (`INIT_FROM_OPTIONS`:
    its frozen weights' format, LoRA adapters on its LM) may stay. model.init_from_revision needs init_from to be a
    Hub name: a local directory has no revisions, and reading it would give another version than the one asked for."""
    revision = model.init_from_revision
    if revision is not None and not (isinstance(revision, str) and revision.strip()):
        raise ValueError(f"model.init_from_revision must be a Hub branch, tag or commit, got {revision!r}")
    if revision is not None and not model.init_from:
        raise ValueError(f"model.init_from_revision={revision!r} is set, but model.init_from is not: name the Hub "
                         "repository to start from, or clear it with model.init_from_revision=null")
    if revision is not None and not is_hub_reference(model.init_from):
        raise ValueError(f"model.init_from_revision={revision!r} names a version of a Hub repository, and "
                         f"model.init_from {model.init_from!r} is {_no_hub_name(model.init_from)}, which has no "
                         "revisions: clear it with model.init_from_revision=null, or give init_from as a Hub name")
    if not model.init_from:
        return
    named = [f"model.{key}" for key in ("vision", "lm", "tokenizer") if getattr(model, key)]
    shaping = sorted(set(model.flamingo) - set(INIT_FROM_OPTIONS))
    if not (named or shaping):
        return
    unused = named + ([f"model.flamingo {shaping}"] if shaping else [])
    clear = [f"{key}=null" for key in named] + (["'model.flamingo={}'"] if shaping else [])
    raise ValueError(f"{', '.join(unused)} {'are' if len(unused) > 1 else 'is'} set, but with model.init_from the "
                     f"model is the one it names (its backbones, tokenizer and blocks; of model.flamingo only "
                     f"{list(INIT_FROM_OPTIONS)} apply to it): clear {'them' if len(unused) > 1 else 'it'} in the "
                     f"config or with {' '.join(clear)}, or set model.init_from=null to build a new model")


def _no_hub_name(source: str) -> str:
    """What a `source` that is no Hub repository here is, for a message."""
    return "a local directory" if os.path.isdir(source) else "a local path" if os.path.exists(source) else "no Hub name"


def check_trainable_quantization(mode: Any, where: str) -> None:
    """Refuse a `quantize_frozen` mode that cannot train (int4: torchao's tinygemm kernel has no backward, so the
    first backward would fail, after the backbones and data have loaded); also called on the model a run starts
    from (model.init_from keeps its saved mode unless model.flamingo sets one)."""
    if mode == "int4":
        raise ValueError(f"{where} is int4, which runs forward only (torchao's tinygemm kernel has no backward): "
                         "train with nf4 (also 4-bit) or int8, and use int4 for generation, evaluation and serving")


def _check_optim_and_schedule(config: TrainConfig) -> None:
    """optim.kind, optim.betas (two numbers in [0, 1)), optim.lr and eps (> 0), weight_decay and the gate multipliers
    (>= 0), schedule.kind and schedule.warmup_steps; a warmup longer than the run is allowed (a run cut short on
    purpose) but said: the lr never reaches optim.lr."""
    o, schedule = config.optim, config.schedule
    if o.kind not in ("adamw", "adamw8bit"):
        raise ValueError(f"optim.kind must be adamw or adamw8bit, got {o.kind!r}")
    betas = o.betas
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {betas!r}")
    o.betas = (float(betas[0]), float(betas[1]))
    # torch's AdamW checks only its constructor's values, not the per-group lr / weight_decay `param_groups` sets: a
    # negative one would run (weights growing, gates ascending the loss)
    for key, positive, note in (("lr", True, ""), ("eps", True, ""), ("weight_decay", False, " (0: no decay)"),
                                ("gate_lr_mult", False, " (0: the gates stay as they are)"),
                                ("attn_gate_lr_mult", False, " or null (null: gate_lr_mult)")):
        value = getattr(o, key)
        if value is not None and (value <= 0 if positive else value < 0):
            raise ValueError(f"optim.{key} must be {'> 0' if positive else '>= 0'}{note}, got {value}")
    if schedule.kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule.kind must be constant, linear or cosine, got {schedule.kind!r}")
    if schedule.warmup_steps < 0:
        raise ValueError(f"schedule.warmup_steps must be >= 0, got {schedule.warmup_steps}")
    if schedule.warmup_steps > config.train.steps:
        _warn_run("schedule.warmup_steps=%d is longer than train.steps=%d: the lr never reaches optim.lr",
                  schedule.warmup_steps, config.train.steps)


def trained_datasets(config: TrainConfig) -> list[DatasetSection]:
    """The `data` a step reads: those of loss_weight > 0 (a weight-0 dataset is never read, in either mixture mode)."""
    return [d for d in config.data if d.loss_weight > 0]


def check_data_weights(config: TrainConfig) -> None:
    """Refuse a config whose every dataset has loss_weight 0: no step would train on any."""
    if not trained_datasets(config):
        raise ValueError("every dataset in `data` has loss_weight 0, so no step would train on any: give one a "
                         f"loss_weight > 0 (got {({d.name: d.loss_weight for d in config.data})})")


def check_in_backward(config: TrainConfig, world: int = 1, distributed: str = "ddp") -> None:
    """optim.in_backward's refusals (train/in_backward.py says why); world, distributed: the run's under torchrun."""
    if not config.optim.in_backward:
        return
    if config.train.grad_clip:
        raise ValueError("optim.in_backward steps each parameter inside backward, before the norm over all gradients "
                         f"exists, so it cannot clip it (train.grad_clip={config.train.grad_clip}): set "
                         "train.grad_clip: 0")
    if config.train.micro_batches > 1 or (config.train.mixture == "accumulate" and len(trained_datasets(config)) > 1):
        raise ValueError("optim.in_backward steps on the gradients of one backward, so it cannot accumulate them over "
                         "train.micro_batches > 1 or over several datasets (train.mixture: accumulate): use one "
                         "micro-batch and train.mixture: sample")
    if world > 1 and distributed != "fsdp":
        raise ValueError("optim.in_backward does not work with DDP (it all-reduces a gradient after the parameter has "
                         "stepped on its local one): use train.distributed: fsdp")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (line and column, from 1), without the quoted context."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config(path: str, overrides: Optional[list[str]] = None) -> TrainConfig:
    """The YAML file at `path` with `overrides` applied, checked (`parse_config`). A file that cannot be read or is
    not YAML text is a ValueError naming it (and where YAML stopped), not a parser's traceback."""
    if os.path.isdir(path):
        raise ValueError(f"the config {path!r} is a directory: name the YAML config file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"no config file {path!r}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"the config {path!r} is not UTF-8 text ({e.reason} at byte {e.start}): name the YAML "
                         "config file") from None
    except OSError as e:
        raise ValueError(f"the config {path!r} cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"the config {path!r} is not valid YAML: {_yaml_problem(e)}") from None
    except TAG_ERRORS as e:  # a tag's constructor refusing its text (`steps: !!int abc`)
        raise ValueError(f"the config {path!r} has a value that is not what its YAML tag says "
                         f"({type(e).__name__}: {e})") from None
    return parse_config(apply_overrides(raw, overrides or []))
