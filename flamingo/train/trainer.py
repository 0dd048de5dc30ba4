"""The training loop: the paper's mixture step, frozen backbones, exact resume, faults, visibility.

One process (CPU or one GPU) needs nothing else; under `torchrun` each rank trains its shard of the data with DDP
(gradients all-reduced once per step) or FSDP2 (`fully_shard` per xattn block and per decoder layer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any, Iterator, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..build import from_backbones, load_pretrained
from ..config import BACKBONE_DIRS, CONFIG_NAME, TRAIN_CONFIG_NAME, FlamingoConfig, lora_spec
from ..convert.auto import checkpoint_format, load_model
from ..data.build import build_sources
from ..data.kinds import resolve_options
from ..data.mixture import MixtureSampler, close_iterators, next_batch
from ..model import lora
from ..model.backbones import lm_max_positions
from ..model.feature_cache import VisionFeatureCache
from ..model.flamingo import Flamingo, kept_on_save, unresolved_backbones
from ..model.quantize import cast_frozen, describe_counts, is_quantized, quantize_frozen, quantized_mode
from ..processing import FlamingoProcessor
from ..runtime import default_device, dist_info, init_process_group_from_env, torch_dtype
from ..runtime.distributed import host_group, max_over_ranks
from ..runtime.hub import is_hub_reference, local_dir
from ..runtime.warn import warn_outside
from .buckets import pad_to_buckets
from .compile import compile_regions
from .config import (
    DatasetSection,
    TrainConfig,
    check_data_weights,
    check_in_backward,
    check_init_from,
    check_trainable_quantization,
)
from .flops import FlopCounts, batch_samples, flop_counts, flops_estimate, peak_flops
from .in_backward import BackwardSteps
from .optim import apply_group_settings, group_settings, make_optimizer, make_scheduler
from .parallel import apply_fsdp, check_shardable, fill_unsharded, unsharded_copy, wrap_ddp
from .plots import plot_run
from .run_log import LossWindow, RunLog, gate_values, materialize, memory_high_water
from .state import (
    gather_all_parameters,
    gather_trained_parameters,
    gather_training_state,
    is_sharded,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rank_entry,
    read_state,
    remove_stale_writes,
    restore_rng,
    rng_state,
    save_checkpoint,
    saved_world_size,
    seed_rank,
)
from .tower_graphs import TowerGraphs, install_tower_graphs
from .validation import Validation

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """What the trainer needs of a dataset: batches for the model and a resumable position."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(ValueError):
    """The loss stayed non-finite (`train.max_nonfinite` steps in a row, or every step of the run): the lr or the
    data need a look. A ValueError: `flamingo train` prints its message as it does a bad config's, no traceback."""


OPTIM_SETTINGS = ("lr", "weight_decay", "betas", "eps", "gate_lr_mult", "attn_gate_lr_mult")  # per-group values


def _starting_options(model: Flamingo, options: dict[str, Any]) -> None:
    """model.flamingo with model.init_from: the options that apply to a trained model (its frozen weights' format, LoRA
    adapters on its LM; the others are refused by `check_init_from`)."""
    if options.get("lm_lora") is not None:
        wanted, saved = lora_spec(options["lm_lora"]), model.config.lm_lora
        if saved is None:
            model.config.lm_lora = wanted
            lora.apply_lora(model.lm, wanted)
        elif lora.same_adapters(saved, wanted):  # the saved adapters train on, under the spec's dropout
            lora.set_dropout(model.lm, wanted["dropout"])
            model.config.lm_lora = {**saved, "dropout": wanted["dropout"]}
        else:
            raise ValueError(f"model.init_from names a model whose LM already holds LoRA adapters "
                             f"({lora.describe(saved)}), and model.flamingo.lm_lora asks for other ones "
                             f"({lora.describe(wanted)}): leave model.flamingo.lm_lora out, or give theirs, to keep "
                             "training them (only the dropout may differ)")
    if "quantize_frozen" in options:
        model.config.quantize_frozen = dataclasses.replace(model.config,
                                                           quantize_frozen=options["quantize_frozen"]).quantize_frozen


REVISION_KEYS = ("vision_revision", "lm_revision")  # the Hub commits a run's backbones were read at


def run_revisions(output_dir: str) -> dict[str, str]:
    """The Hub commits the run in `output_dir` read its backbones at (its latest checkpoint's state.json), so that a
    resumed run trains on the weights it started on after their repositories move on; {} for a new run, local
    backbones, or checkpoints written before state.json held them."""
    path = latest_checkpoint(output_dir) if output_dir else None
    if path is None:
        return {}
    saved = read_state(path).get("backbone_revisions") or {}
    return {k: v for k, v in saved.items() if k in REVISION_KEYS and isinstance(v, str)}


def build_model(config: TrainConfig, revisions: Optional[dict[str, str]] = None
                ) -> tuple[Flamingo, FlamingoProcessor]:
    """The run's model; revisions: Hub commits to read backbones given by Hub name at (`run_revisions`), where
    model.flamingo names none."""
    m = config.model
    check_init_from(m)  # model options a run from init_from would not use: refused (a config not from parse_config)
    revision = m.init_from_revision  # the Hub revision init_from is read at (None: its default branch)
    if m.init_from and checkpoint_format(m.init_from, revision) != "flamingo":  # IDEFICS, Otter, OpenFlamingo
        # float32 master weights, as below: in its stored dtype (bf16 for IDEFICS) the trained blocks and their AdamW
        # states would be bf16 and most small updates would round away. Read in bf16 and cast after, the LM's rotary
        # frequencies would stay rounded to bf16; train.frozen_dtype casts the frozen parts after (Trainer).
        model, processor = load_model(m.init_from, revision=revision, torch_dtype=torch.float32)
        _starting_options(model, m.flamingo)
        return model, processor
    if m.init_from:  # its backbones are quantized (to its saved mode) by the Trainer, once on its device
        directory = local_dir(m.init_from, "Flamingo model", revision=revision)
        mode = FlamingoConfig.load(directory).quantize_frozen
        # float32 master weights whatever the file's dtype (train.precision casts the frozen parts after)
        model, processor = load_pretrained(directory, quantize_frozen="none", torch_dtype=torch.float32)
        model.config.quantize_frozen = mode
        _starting_options(model, m.flamingo)
        return model, processor
    if not (m.vision and m.lm):
        raise ValueError("model.vision and model.lm (or model.init_from) are required")
    pinned = {k: v for k, v in (revisions or {}).items()  # a backbone now given by a local path has no revisions
              if is_hub_reference(str(m.vision if k == "vision_revision" else m.lm))}
    # the commits the run trained on win over a branch or tag model.flamingo names, which may have moved since;
    # built float, its backbones quantized (to model.flamingo's mode) by the Trainer, once on its device
    config = FlamingoConfig(**{**m.flamingo, **pinned})
    mode, config.quantize_frozen = config.quantize_frozen, "none"
    model, processor = from_backbones(m.vision, m.lm, m.tokenizer, config)
    model.config.quantize_frozen = mode
    return model, processor


def _planned_quantize_mode(config: TrainConfig) -> str:
    """The frozen weights' format the run will quantize to, as far as it is known before the model loads:
    model.flamingo.quantize_frozen, else the saved mode of a model.init_from folder of ours (a Hub init_from or
    another format is checked once loaded)."""
    m = config.model
    if "quantize_frozen" in (m.flamingo or {}):
        return m.flamingo["quantize_frozen"]
    if m.init_from and os.path.isfile(os.path.join(m.init_from, CONFIG_NAME)):
        return FlamingoConfig.load(m.init_from).quantize_frozen
    return "none"


def final_save_trained_only(model: Flamingo, save_trained_only: Optional[bool]) -> bool:
    """Whether the final model is saved trained-only: `train.save_trained_only`, or by default when both backbone
    references resolve here (`unresolved_backbones`): a model from `model.init_from` a full checkpoint copied from
    another machine keeps its builder's paths, and a trained-only save of it could not load, so it is saved full."""
    if save_trained_only is not None:
        return save_trained_only
    c = model.config
    return bool(c.vision_name_or_path and c.lm_name_or_path) and not unresolved_backbones(c)


def whole_model_dir(name_or_path: Optional[str]) -> Optional[str]:
    """The local directory of a model saved here whole (its config beside `vision/` and `lm/`) that a model was loaded
    from (`name_or_path`; the trainer loads model.init_from from its local copy, a Hub snapshot's included): those
    directories hold the float backbones the model was built on, which training never changes. None for any other
    model (a conversion in memory, a trained-only checkpoint, a model built from backbones)."""
    if not name_or_path or not os.path.isfile(os.path.join(name_or_path, CONFIG_NAME)):
        return None
    whole = all(os.path.isdir(os.path.join(name_or_path, part)) for part in BACKBONE_DIRS)
    return os.path.abspath(name_or_path) if whole else None


def backbone_stamps(directory: str) -> dict[str, tuple[int, int]]:
    """Each file under the `vision/` and `lm/` of the saved model in `directory` -> (size, modification time in ns),
    symbolic links followed (a Hub snapshot's files point into its blobs): what tells whether the files changed
    since, without reading them."""
    stamps = {}
    for part in BACKBONE_DIRS:
        for root, _, files in os.walk(os.path.join(directory, part), followlinks=True):
            for name in files:
                path = os.path.join(root, name)
                info = os.stat(path)
                stamps[os.path.relpath(path, directory)] = (info.st_size, info.st_mtime_ns)
    return stamps


def check_final_save(model: Flamingo, save_trained_only: Optional[bool], backbones_from: Optional[str] = None
                     ) -> None:
    """Refuse, before step 1, a run whose final `save_pretrained` would fail after its last step: quantized
    backbones saved whole without a float copy to take them from (`backbones_from`: the whole saved model the run
    started from, `whole_model_dir`), a trained-only save without backbone names or with names that do not resolve
    here, and backbone weights the model changed (`extra_saved_weights`: merged LoRA) that are now quantized or
    wrapped by new LoRA adapters."""
    c = model.config
    named = bool(c.vision_name_or_path and c.lm_name_or_path)
    unresolved = unresolved_backbones(c)
    trained_only = final_save_trained_only(model, save_trained_only)
    if trained_only and not named:
        raise ValueError("train.save_trained_only: true needs backbones by name (model.vision / model.lm, or "
                         "init_from a model saved with them): set it to false or null")
    if trained_only and unresolved:
        raise ValueError(f"train.save_trained_only: true, but the model's backbone(s) {', '.join(unresolved)} are "
                         "neither a directory here nor a Hub name, so its trained-only final model could not load: "
                         "set it to false or null (a full save)")
    if c.quantize_frozen != "none" and not trained_only and backbones_from is None:
        why = ("train.save_trained_only is false" if save_trained_only is False
               else f"its backbone(s) {', '.join(unresolved)} do not resolve here" if unresolved
               else "it names no backbone to load by name")
        remedies = (["set train.save_trained_only: true or null"] if named and not unresolved else []) + [
            "init_from a model saved whole (a directory holding vision/ and lm/, whose float backbones the final "
            "save copies; `flamingo convert` writes one from an IDEFICS, Otter or OpenFlamingo checkpoint)",
            "train without quantize_frozen"]
        raise ValueError(f"model.flamingo.quantize_frozen={c.quantize_frozen}: quantized backbones are never saved "
                         f"whole (quantizing is lossy), and the final model is saved whole ({why}) with no float copy "
                         f"of its backbones to take: {'; or '.join(remedies)}")
    rank0 = dist_info()[0] == 0  # said once, by rank 0
    if c.quantize_frozen != "none" and not trained_only and rank0:
        log.info("the final model will be saved whole, its backbones copied unquantized from %s/{vision,lm}",
                 backbones_from)
    elif unresolved and save_trained_only is None and rank0:
        log.info("the final model will be saved full: the backbone(s) %s do not resolve here", ", ".join(unresolved))
    state = model.state_dict()
    changed = [n for n in c.extra_saved_weights if n not in state or is_quantized(state[n])]
    if changed:
        raise ValueError(f"the model's changed backbone weights {changed[:3]} (extra_saved_weights: a merged LoRA, a "
                         "fine-tuned table) would be saved from layers that model.flamingo.lm_lora wraps or "
                         "quantize_frozen packs: train without those options, or from the model before merging")


def _quantize(model: Flamingo) -> None:
    """model.flamingo.quantize_frozen, packed on the training device, with what it did logged (layers whose width the
    format cannot split stay in float); every rank quantizes, rank 0 logs."""
    counts = quantize_frozen(model)
    if dist_info()[0] == 0:
        log.info("%s", describe_counts(model.config.quantize_frozen, counts))


# FlamingoConfig fields `from_backbones` fills in from the backbones and tokenizer it is given (model.flamingo's are
# overwritten, or resolved: a branch to its commit): they describe how a model is built, as model.vision / model.lm do
BUILT_FIELDS = ("vision_name_or_path", "lm_name_or_path", "vision_revision", "lm_revision", "media_token_id",
                "end_of_chunk_token_id", "pad_token_id", "first_new_token_id", "num_new_tokens",
                "first_reference_token_id")


def check_given_model(model: Flamingo, options: dict[str, Any]) -> None:
    """Trainer(config, model=...) trains the model as it is given: model.flamingo options whose value differs from
    the model's config (lm_lora, xattn_every, quantize_frozen, ...) would go unused while final/train_config.json
    records them, so they are refused, never ignored, as model.init_from refuses the options it would not use.
    model.vision / model.lm / model.tokenizer and the `BUILT_FIELDS` are not compared."""
    differ = []
    for key, wanted in sorted(options.items()):
        if key in BUILT_FIELDS:
            continue
        have = getattr(model.config, key)
        try:  # normalized as the model's config holds it (lm_lora's defaults, quantize_frozen's aliases)
            wanted = getattr(dataclasses.replace(model.config, **{key: wanted}), key)
        except (ValueError, TypeError):  # (a value the model's config cannot take differs from it)
            pass
        if key == "lm_lora" and isinstance(wanted, dict) and isinstance(have, dict):  # target order is no change
            same = lora.same_adapters(wanted, have) and wanted["dropout"] == have["dropout"]
        else:
            same = _plain(wanted) == _plain(have)
        if not same:
            differ.append(f"{key}: {have!r} on the model, {wanted!r} in the config")
    if differ:
        raise ValueError(f"Trainer(config, model=...) trains the model as given, and model.flamingo differs from its "
                         f"config ({'; '.join(differ)}): those options would go unused while final/train_config.json "
                         "records them. Give the model's values in model.flamingo or leave them out, or build the "
                         "model with them (build_model(config), or load_pretrained(..., quantize_frozen=...))")


def fit_max_tokens(datasets: Sequence[DatasetSection], positions: Optional[int], warn: bool = True
                   ) -> list[DatasetSection]:
    """`datasets` with samples that fit the LM's positions: the forward refuses a longer one, which would stop the
    run when the first such sample is drawn (hours in, and again on resume). A `max_tokens` the config sets above the
    positions is refused; a kind's default above them (chat's 512 on a 256-position LM) is lowered to the positions,
    said once (`warn`). Packed rows (`pack_tokens`) may be wider: positions restart at each sample."""
    if positions is None:
        return list(datasets)
    fitted = []
    for d in datasets:
        max_tokens = int(resolve_options(d.kind, d.options)["max_tokens"])
        if max_tokens > positions and "max_tokens" in (d.options or {}):
            raise ValueError(f"dataset {d.name!r}: max_tokens {max_tokens} is more than the LM's {positions} "
                             f"positions: set its max_tokens to at most {positions}")
        if max_tokens > positions:
            if warn:
                log.warning("dataset %r: the %s default max_tokens %d is more than the LM's %d positions: its samples "
                            "are cut to %d tokens (set max_tokens to choose)", d.name, d.kind, max_tokens, positions,
                            positions)
            d = dataclasses.replace(d, options={**(d.options or {}), "max_tokens": positions})
        fitted.append(d)
    return fitted


def float32_masters(model: Flamingo) -> list[str]:
    """Cast every trained parameter that is not float32 (a model loaded or built in bf16) to float32 master weights,
    as `build_model` loads model.init_from: in bf16 the weights and their AdamW states would round away most
    fine-tuning-sized updates. Returns the names cast."""
    cast = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast.append(name)
    return cast


def check_frozen_dtypes(model: Flamingo, precision: str) -> None:
    """The frozen floating weights (quantized ones aside) must be float32, or bf16 under `train.precision: bf16`: the
    combinations `train.frozen_dtype` allows (checked in train/config.py), here for a model given in another dtype."""
    allowed = {torch.float32} | ({torch.bfloat16} if precision == "bf16" else set())
    for name, p in model.named_parameters():
        if not p.requires_grad and p.is_floating_point() and not is_quantized(p) and p.dtype not in allowed:
            remedies = (["train.precision: bf16 (autocast, as train.frozen_dtype: bf16 runs)"]
                        if p.dtype == torch.bfloat16 else [])
            remedies.append(f"train.frozen_dtype: {'fp32' if precision == 'fp32' else 'bf16 or fp32'} to cast them")
            raise ValueError(f"the model's frozen weights are {str(p.dtype).removeprefix('torch.')} ({name}, ...), "
                             f"and under train.precision: {precision} they must be float32"
                             f"{'' if precision == 'fp32' else ' or bf16'}: set {', or '.join(remedies)}")


class Trainer:
    def __init__(self, config: TrainConfig, sources: Optional[dict[str, BatchSource]] = None,
                 model: Optional[Flamingo] = None, processor: Optional[FlamingoProcessor] = None) -> None:
        self.config = config
        t = config.train
        check_data_weights(config)  # before the model loads (a config made in Python, not by parse_config)
        self.rank, self.world, self.local_rank = dist_info()
        check_in_backward(config, self.world, t.distributed)
        if self.world > 1 and t.distributed == "fsdp":  # before the model loads (a Hub init_from's mode: after)
            check_shardable(t.fsdp_frozen, _planned_quantize_mode(config) != "none")
        self.device = default_device(t.device or None)  # train.device, else cuda:LOCAL_RANK, else the CPU
        init_process_group_from_env(self.device)
        self.host_group = host_group()  # the loop's stop flag is agreed on here (gloo: no host sync with the GPU)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(t.seed)  # same initial weights on every rank
        if model is None:
            model, processor = build_model(config, run_revisions(t.output_dir))
        else:
            check_given_model(model, config.model.flamingo)
        if processor is None:  # (not an assert: `python -O` would fail deep in the data's encoding)
            raise ValueError("Trainer(config, model=...) needs processor=: the processor saved with the model "
                             "(load_pretrained returns both)")
        self.model, self.processor = model, processor
        positions = self.positions = lm_max_positions(model.lm)  # (None: no limit)
        data = fit_max_tokens(config.data, positions, warn=self.rank == 0)  # before any step
        validation = fit_max_tokens(config.validation, positions, warn=self.rank == 0)
        # the LM's output rows (before quantizing or sharding changes the weight's shape): they decide the chat format
        # chat data is written in, as the model is served (`chat_format_for`)
        vocab = model.lm.get_output_embeddings().weight.shape[0]
        backbones_from = whole_model_dir(model.name_or_path)  # where a whole final save finds the float backbones
        model.name_or_path = None  # trained from here on: no longer the model saved where it was loaded from
        check_trainable_quantization(model.config.quantize_frozen, "model.flamingo.quantize_frozen (or the saved "
                                     "mode of model.init_from, which it overrides)")
        if t.frozen_dtype:
            cast_frozen(model, torch_dtype(t.frozen_dtype))
        cast = float32_masters(model)  # a model given in bf16 (`build_model`'s are float32)
        if cast and self.rank == 0:
            log.info("the model's %d trained parameter(s) not in float32 (%s, ...) train as float32 master weights",
                     len(cast), cast[0])
        check_frozen_dtypes(model, t.precision)
        model.to(self.device)
        if model.config.quantize_frozen != "none":
            _quantize(model)
        check_final_save(model, t.save_trained_only, backbones_from)  # now, not after the last step
        # a final/ of an earlier run that holds files no save writes would refuse the final save (it would delete
        # them): said now too
        kept_on_save(os.path.join(t.output_dir, "final"), with_processor=True)
        # quantized backbones saved whole: copied from backbones_from at the end, checked unchanged since they loaded
        self.backbones_from: Optional[tuple[str, dict[str, tuple[int, int]]]] = None
        if model.config.quantize_frozen != "none" and not final_save_trained_only(model, t.save_trained_only):
            assert backbones_from is not None  # (check_final_save)
            self.backbones_from = (backbones_from, backbone_stamps(backbones_from))
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        # the probe runs eagerly, before any region is compiled or sharded
        if t.loss_chunks and not model.head_is_last_op() and self.rank == 0:
            log.info("train.loss_chunks=%d: %s changes its head's output (soft-capping, scaling), so the loss uses "
                     "the whole logits", t.loss_chunks, type(model.lm).__name__)
        # FSDP: the final save needs the model unsharded on rank 0, as it trained (frozen_dtype, LoRA, quantization; a
        # model given to the Trainer, whose config may name other backbones or placeholders): rank 0 keeps a copy of
        # it, its parameters meta tensors until then (`unsharded_copy`), taken before compiling or sharding
        self.unsharded: Optional[Flamingo] = None
        if self.world > 1 and t.distributed == "fsdp" and self.rank == 0:
            self.unsharded = unsharded_copy(model, share_frozen=t.fsdp_frozen == "replicate")
        if t.compile:  # regions compiled in place, before any DDP/FSDP wrapping (their hooks stay outside)
            compile_regions(model, dynamic=t.compile_dynamic)
        self.tower_graphs: Optional[TowerGraphs] = None
        if t.vision_cuda_graphs:
            if self.world > 1 and t.distributed == "fsdp" and t.fsdp_frozen == "shard":
                raise ValueError("train.vision_cuda_graphs cannot capture a sharded tower (FSDP all-gathers its "
                                 "layers in every call): set train.fsdp_frozen: replicate or train.distributed: ddp")
            self.tower_graphs = install_tower_graphs(model.vision, frames_multiple=t.vision_graph_frames_multiple)
        # padding buckets: 8 tokens by default when compiling (aligned shapes at < 8 tokens of padding a row; automatic
        # dynamic shapes keep the graphs few), none otherwise
        self.pad_tokens_multiple = t.pad_tokens_multiple or (8 if t.compile else 1)
        self.pad_media_multiple = t.pad_media_multiple or 1
        # compiled on a CPU: the dense masked cross-attention (the per-image segments have data-dependent shapes, a
        # graph break each; FlexAttention has no CPU backward). On a GPU "auto" picks FlexAttention for training.
        self.xattn_impl = "reference" if t.compile and self.device.type != "cuda" else "auto"
        self.wrapped: nn.Module = model
        if self.world > 1:
            if t.distributed == "fsdp":
                apply_fsdp(model, frozen=t.fsdp_frozen,
                           param_dtype=torch.bfloat16 if t.precision == "bf16" else None)
            else:
                self.wrapped = wrap_ddp(model, self.device)
        if self.rank:  # other dropout masks per rank; rank 0 (one process) draws on from `seed`, as before
            seed_rank(t.seed, self.rank)
        o = config.optim
        self.optimizer = make_optimizer(model, o.lr, o.weight_decay, o.betas, o.eps, fused=o.fused,
                                        gate_lr_mult=o.gate_lr_mult, attn_gate_lr_mult=o.attn_gate_lr_mult,
                                        kind=o.kind)
        self.scheduler = make_scheduler(self.optimizer, config.schedule.kind, config.schedule.warmup_steps, t.steps)
        self.weights = {d.name: d.loss_weight for d in config.data}
        if sources is None:
            sources = build_sources(data, processor, rank=self.rank, world_size=self.world, seed=t.seed,
                                    num_workers=t.num_workers, vocab=vocab)
        self.sources = sources
        self.validation: Optional[Validation] = None
        if config.validation:  # held-out datasets, seeded apart from the training ones
            self.validation = Validation(
                build_sources(validation, processor, rank=self.rank, world_size=self.world,
                              seed=t.seed + 10**6, num_workers=t.num_workers, vocab=vocab),
                max_batches=t.eval_batches, world=self.world, progress=self.rank == 0 and t.progress)
        self.vision_cache: Optional[VisionFeatureCache] = None
        if t.cache_vision_features_mib > 0:
            if not model.config.freeze_vision:
                raise ValueError("train.cache_vision_features_mib needs a frozen vision tower (freeze_vision: true)")
            if self.world > 1 and t.distributed == "fsdp" and t.fsdp_frozen == "shard":  # a rank that skips the
                # sharded tower (its frames cached) would hang the others in its all-gathers
                raise ValueError("train.cache_vision_features_mib needs the tower whole on every rank under FSDP: set "
                                 "train.fsdp_frozen: replicate (or use ddp)")
            self.vision_cache = VisionFeatureCache.of_mib(t.cache_vision_features_mib)
        # FSDP: a micro-batch without any medium (text-only chat rows) still runs the tower and the resampler, on one
        # blank frame that no token sees (the attention term stays exactly zero), so that every rank joins each
        # sharded module's all-gathers and reduce-scatters in the same order
        self.blank_frame: Optional[torch.Tensor] = None
        if self.world > 1 and t.distributed == "fsdp":
            self.blank_frame = processor.preprocess_media(Image.new("RGB", (8, 8))).to(self.device)  # (F, C, H, W)
        self.iterators: dict[str, Iterator[dict[str, Any]]] = {}
        # closed when the trainer goes or at interpreter exit, while the modules a stream's `finally` calls still
        # exist (the garbage collector would finalize them after the modules are torn down: "Exception ignored")
        weakref.finalize(self, close_iterators, self.iterators)
        self.step, self.resumed = 0, False  # `_resume` sets both from a checkpoint
        self._runs = 0  # `run` calls so far: a later one continues the run (from `step`), its logs included
        self.flop_counts: Optional[FlopCounts] = None  # taken at the first step (flops.flop_counts)
        # counters on the device, so that a step needs no host sync (read at logged steps and checkpoints)
        self.nonfinite_streak = torch.zeros((), dtype=torch.long, device=self.device)
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=self.device)
        self.trained = [p for p in model.parameters() if p.requires_grad]
        # optim.in_backward: the optimizer steps inside backward, one parameter at a time (train/in_backward.py)
        self.backward_steps = BackwardSteps(self.trained, self.optimizer) if o.in_backward else None
        self.skip_on_device = bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))  # fused Adam(W)
        self.stop_signal = 0  # the SIGTERM / SIGINT this process got (0: none)
        self.stopped_by = 0  # the signal the ranks agreed to stop on (`run`): 0 when the run went to train.steps
        self._previous_handlers: dict[int, Any] = {}
        self._saved_step = -1  # the step of the last checkpoint this process wrote
        self._unfinished_step: Optional[tuple[list[str], list[tuple[str, dict[str, Any]]]]] = None  # train_step's
        self._half_step: Optional[tuple[int, int]] = None  # (step, parameters stepped): `_check_whole_step`
        # `sample` mixture mode: one dataset per step, drawn by loss weight (the same draws on every rank)
        self.sampler = MixtureSampler({name: self.weights[name] for name in self.sources}, seed=t.seed + 1)
        os.makedirs(t.output_dir, exist_ok=True)
        if self.rank == 0:
            remove_stale_writes(t.output_dir)
        self._resume()

    # ---------------------------------------------------------------------------------------------- resume
    def _resume(self) -> None:
        """Load the output directory's latest checkpoint, if any. One past `train.steps` is refused (nothing would
        train and `final/` would be the longer run's weights under this config); one at it only warns (its `final/`
        is written again). The config's optimizer settings apply from here on (`_apply_optim_settings`)."""
        t = self.config.train
        found = list_checkpoints(t.output_dir)
        if not found:
            return
        step, path = found[-1]
        if step > t.steps:
            raise ValueError(f"{t.output_dir} holds a run at step {step} ({path}), past train.steps={t.steps}: raise "
                             "train.steps to train it further, or use a new train.output_dir")
        fresh = group_settings(self.optimizer)  # the config's, before the checkpoint's replace them
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.device, self.config.optim.kind)
        self.step, self.resumed = state["step"], True
        self._apply_optim_settings(path, state, fresh)
        self._log_lora_dropout(path, state)
        self._log_frozen_storage(path, state)
        self.nonfinite_streak.fill_(state["nonfinite_streak"])
        self.skipped_steps.fill_(state["skipped_steps"])
        # a checkpoint without "mixture" holds the same generator state as "sample_generator": it resumes too
        self.sampler.load_state_dict(state["mixture"] if "mixture" in state else
                                     {"generator": state["sample_generator"]})
        saved_world = saved_world_size(state)
        if saved_world != self.world and self.rank == 0:
            log.warning("%s was written by %d process(es), resumed by %d: not an exact resume (each dataset restarts "
                        "its epoch; rank r takes the saved rank r's random generators, a rank the run did not have "
                        "is seeded with train.seed + r)", path, saved_world, self.world)
        restore_rng(path, state, self.rank, t.seed, self.device)
        if state.get("seed", t.seed) != t.seed and self.rank == 0:  # (None: written before state.json held it)
            log.warning("resuming from %s with train.seed %s -> %s: the datasets go on in the order they were saved "
                        "with and the random generators are the checkpoint's; the new seed applies to the validation "
                        "sources (and to ranks the run did not have) only", path, state["seed"], t.seed)
        # a run written before state.json held it averaged its passes' means (where there were several passes)
        saved_average = state.get("loss_average") or ("passes" if t.micro_batches > 1 or saved_world > 1 else None)
        if saved_average not in (None, t.loss_average) and self.rank == 0:
            log.warning("resuming from %s with train.loss_average %s -> %s: the resumed steps weigh their passes' "
                        "losses otherwise than the run did (set train.loss_average: %s to go on as it ran)", path,
                        saved_average, t.loss_average, saved_average)
        data_states = rank_entry(state["data"], self.rank)  # a rank the run did not have: rank 0's, restarted
        added, dropped = sorted(set(self.sources) - set(data_states)), sorted(set(data_states) - set(self.sources))
        if (added or dropped) and self.rank == 0:  # the config's datasets changed (a new name is a new dataset)
            changes = (([f"{added} start from their beginning"] if added else [])
                       + ([f"{dropped} are no longer read"] if dropped else []))
            warn_outside(f"resuming from {path} with other datasets than it was saved with: {', '.join(changes)} (the "
                         "others go on from their saved positions)")
        for name, source in self.sources.items():
            if name in data_states:
                source.load_state_dict(data_states[name])
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)
            if self.step == t.steps:
                log.warning("%s already holds a run at train.steps=%d: nothing to train; final/ is written again "
                            "from its checkpoint", t.output_dir, t.steps)

    def _apply_optim_settings(self, path: str, state: dict[str, Any], fresh: list[dict[str, Any]]) -> None:
        """The config's optimizer settings (`optim.lr`, `weight_decay`, `betas`, `eps`, the gate multipliers) over
        the checkpoint's, from the resumed step on: a run resumed with a lower lr trains at that lr (the schedule's
        multiplier at the step times the new base). The change is logged, naming each key. Each group's lr is set
        from the schedule whatever changed: the checkpoint's is the old schedule's, and a resume that raised
        `train.steps` has a new one (its first step would run at the old lr, 0 at the end of a cosine)."""
        changed = group_settings(self.optimizer) != fresh
        apply_group_settings(self.optimizer, self.scheduler, fresh)
        if not changed:
            return
        now, saved = asdict(self.config.optim), state.get("optim")  # None: written before state.json held them
        changes = ", ".join(f"optim.{k} {saved.get(k)} -> {now[k]}" for k in OPTIM_SETTINGS
                            if saved is not None and _plain(saved.get(k)) != _plain(now[k]))
        changes = changes or "the parameter groups' lr / weight_decay / betas / eps"
        if self.rank == 0:
            log.warning("resuming from %s with other optimizer settings than it was saved with (%s): the config's "
                        "apply from step %d on", path, changes, self.step + 1)

    def _log_lora_dropout(self, path: str, state: dict[str, Any]) -> None:
        """A changed `lm_lora.dropout` resumes (it acts in training only; `check_resumable` refuses the other keys'
        changes), and is logged: the config's applies from the resumed step on."""
        saved, now = state.get("lm_lora"), self.model.config.lm_lora
        if self.rank == 0 and saved is not None and now is not None and saved.get("dropout") != now["dropout"]:
            log.warning("resuming from %s with model.flamingo.lm_lora.dropout %s -> %s: the config's applies from "
                        "step %d on", path, saved.get("dropout"), now["dropout"], self.step + 1)

    def _frozen_storage(self) -> dict[str, Any]:
        """How the frozen backbones are stored and run: a resume under other settings computes another function
        (quantization or rounding of the frozen weights), so `_log_frozen_storage` names the change."""
        return {"model.flamingo.quantize_frozen": self.model.config.quantize_frozen,
                "train.frozen_dtype": self.config.train.frozen_dtype, "train.precision": self.config.train.precision}

    def _log_frozen_storage(self, path: str, state: dict[str, Any]) -> None:
        """A resume with another `quantize_frozen`, `frozen_dtype` or `precision` than the checkpoint's run is no
        exact resume: the frozen weights' numbers change at the resume point. It proceeds (the trained tensors and
        optimizer states are the same), logged naming each key; checkpoints written before state.json held them are
        not compared."""
        saved, now = state.get("frozen_storage"), self._frozen_storage()
        if self.rank != 0 or saved is None:
            return
        changes = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v)
        if changes:
            log.warning("resuming from %s with other frozen-backbone settings than it was saved with (%s): not an "
                        "exact resume, the frozen weights compute differently from step %d on", path, changes,
                        self.step + 1)

    def _rank_states(self) -> tuple[Any, list[Any]]:
        """(data positions, RNG states) of every rank, gathered on every rank: a list by rank each (the positions of
        one process: its dict)."""
        local = ({name: source.state_dict() for name, source in self.sources.items()}, rng_state(self.device))
        if self.world == 1:
            return local[0], [local[1]]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, local, group=self.host_group)  # CPU objects
        return [data for data, _ in gathered], [rng for _, rng in gathered]

    def save(self) -> None:
        self._check_whole_step()
        data, rng = self._rank_states()
        trained, optimizer_state = gather_training_state(self.model, self.optimizer)  # collective under FSDP
        if self.rank == 0:
            save_checkpoint(self.config.train.output_dir, self.step, trained, optimizer_state, self.scheduler,
                            {"world_size": self.world, "nonfinite_streak": int(self.nonfinite_streak),
                             "skipped_steps": int(self.skipped_steps), "mixture": self.sampler.state_dict(),
                             "data": data, "optim_kind": self.config.optim.kind, "optim": asdict(self.config.optim),
                             "lm_lora": self.model.config.lm_lora, "frozen_storage": self._frozen_storage(),
                             "backbone_revisions": {k: getattr(self.model.config, k) for k in REVISION_KEYS},
                             "seed": self.config.train.seed, "loss_average": self.config.train.loss_average},
                            self.config.train.keep_last, rng=rng)
        if self.world > 1:
            dist.barrier()
        self._saved_step = self.step

    # ---------------------------------------------------------------------------------------------- step
    def _next(self, name: str) -> dict[str, Any]:
        return next_batch(self.sources, self.iterators, name)  # at an epoch's end: the source's next epoch

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's inputs on the device, except `num_media` / `num_frames`: kept on the CPU, they select the
        real media without a host sync; the `<image>` count check runs here, on the CPU batch, for the same reason."""
        self.model.check_media_tokens(batch["input_ids"], batch.get("num_media"))
        if self.pad_tokens_multiple > 1 or self.pad_media_multiple > 1:
            batch = pad_to_buckets(batch, tokens_multiple=self.pad_tokens_multiple,
                                   media_multiple=self.pad_media_multiple,
                                   pad_token_id=self.processor.tokenizer.pad_token_id, max_tokens=self.positions)
        pin = self.device.type == "cuda"  # page-locked, so that the copies below overlap the step's kernels
        moved = {k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True) if isinstance(v, torch.Tensor)
                 else v for k, v in batch.items()
                 if k in ("input_ids", "attention_mask", "labels", "images", "document_ids")}
        moved.update({k: batch[k] for k in ("num_media", "num_frames") if k in batch})
        if self.blank_frame is not None and not bool(torch.as_tensor(batch.get("num_media", 0)).any()):
            rows = batch["input_ids"].shape[0]  # the blank is the first row's only medium; no <image> token sees it
            moved["images"] = self.blank_frame.expand(rows, 1, *self.blank_frame.shape)  # a view: no copy a step
            moved["num_media"] = (torch.arange(rows) == 0).long()
            moved.pop("num_frames", None)
        if self.vision_cache is not None:
            moved["vision_cache"] = self.vision_cache
        return {**moved, "check_media": False, "xattn_impl": self.xattn_impl,
                "loss_chunks": self.config.train.loss_chunks}

    def _autocast(self) -> Any:
        """train.precision's context for a forward: bf16 autocast, or none (fp32)."""
        if self.config.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _step_datasets(self) -> list[str]:
        """The datasets this step reads: in `accumulate` mode every one with a loss weight > 0 (the paper: one batch
        of each, gradients accumulated; a weight-0 one would cost a read and a forward for a loss times 0, and its
        NaN would skip the step), in `sample` mode one drawn by weight (never a weight-0 one). A dataset left out is
        not read: its position stays where it is."""
        if self.config.train.mixture == "accumulate":
            return [name for name in self.sources if self.weights[name] > 0]
        return [self.sampler.draw()]

    def train_step(self) -> dict[str, Any]:
        self._check_whole_step()
        t = self.config.train
        self.optimizer.zero_grad(set_to_none=True)
        autocast = self._autocast()
        losses: dict[str, torch.Tensor] = {}
        samples, flops = 0, 0.0
        dataset_samples: dict[str, int] = {}  # this rank's samples of each dataset read
        if self._unfinished_step is None:
            names = self._step_datasets()
            passes = [(name, mb) for name in names for mb in self._micro_batches(self._next(name))]
            # kept until the step ends: a step that raised (a Ctrl-C, an error; then run() again) trains on the
            # batches it drew, which the sources have moved past
            self._unfinished_step = (names, passes)
        names, passes = self._unfinished_step
        shares = self._token_shares(passes)
        for i, ((name, batch), share) in enumerate(zip(passes, shares)):
            rows = batch_samples(batch)
            samples += rows
            dataset_samples[name] = dataset_samples.get(name, 0) + rows
            batch = self._to_device(batch)
            if self.flop_counts is None:  # the model as it trains (after LoRA, quantization, casts)
                self.flop_counts = flop_counts(self.model)
            flops += flops_estimate(self.model, batch, self.flop_counts)
            weight = self.weights[name] if t.mixture == "accumulate" else 1.0
            sync = i == len(passes) - 1 or not isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
            with (nullcontext() if sync else self.wrapped.no_sync()), autocast:
                loss = self.wrapped(**batch).loss * share
            losses[name] = losses.get(name, 0.0) + loss.detach()
            if self.backward_steps is not None:
                # the step's only pass (check_in_backward): its backward steps the parameters, so its loss is
                # checked first
                finite, total, losses = self._reduce_losses(losses, names)
                self._begin_backward_steps(finite)
            try:
                (loss * weight).backward()
            except BaseException:
                if self.backward_steps is not None and self.backward_steps.stepped:
                    self._half_step = (self.step + 1, self.backward_steps.stepped)
                raise
        if self.backward_steps is not None:
            if self.backward_steps.stepped:  # until the step is counted: a raise from here on leaves a half step
                self._half_step = (self.step + 1, self.backward_steps.stepped)
            grad_norm = self.backward_steps.grad_norm(sharded=is_sharded(self.model))
            # a parameter whose gradient was not finite was left unstepped (in_backward.py): counted as a skipped
            # step, whose streak aborts the run as a non-finite loss's does (the norm is global: no host sync)
            finite = finite & torch.isfinite(grad_norm)
        else:
            finite, total, losses = self._reduce_losses(losses, names)
            grad_norm, finite = self._clip_and_step(finite)
        self.nonfinite_streak = torch.where(finite, 0, self.nonfinite_streak + 1)
        self.skipped_steps = self.skipped_steps + (~finite).long()
        lr = self.optimizer.param_groups[0]["lr"]  # this step's, before the scheduler sets the next step's
        lr = lr.clone() if isinstance(lr, torch.Tensor) else lr  # torchao's is a tensor, filled in place
        if self.step == 0:  # a skipped first step never called optimizer.step(), and torch warns that the schedule's
            # first value is skipped: wrong here, the schedule counts steps, skipped or not. (Only at the first step:
            # catch_warnings resets which warnings were shown once.)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
                self.scheduler.step()
        else:
            self.scheduler.step()
        self.step += 1
        self._unfinished_step = self._half_step = None
        if not self.skip_on_device:
            self.check_nonfinite()  # `finite` is on the host already
        # tensors stay on the device: `materialize` reads them, once per logged step
        return {"step": self.step, "loss": total.detach(), "lr": lr,
                "grad_norm": grad_norm.detach(), "samples": samples * self.world, "flops": flops * self.world,
                "skipped_nonfinite": self.skipped_steps, **{f"loss/{n}": v for n, v in losses.items()},
                **{f"samples/{n}": v * self.world for n, v in dataset_samples.items()}}

    def _reduce_losses(self, losses: dict[str, torch.Tensor], names: list[str]
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Whether the step's total loss is finite on every rank (a () bool on the device), the total and the
        per-dataset losses to log (under torchrun the ranks' mean: what the all-reduced gradient is the gradient of)."""
        t = self.config.train
        total = sum(self.weights[n] * losses[n] for n in losses) if t.mixture == "accumulate" else losses[names[0]]
        finite = torch.isfinite(total)  # () on the device
        if self.world > 1:
            finite = finite.float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            finite = finite.bool()
            logged = torch.stack([total, *losses.values()]).detach().float()
            dist.all_reduce(logged, op=dist.ReduceOp.SUM)
            logged /= self.world
            total, losses = logged[0], dict(zip(losses, logged[1:]))
        return finite, total, losses

    def _clip_and_step(self, finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimizer step after backward, clipped to train.grad_clip (0: not clipped); returns the gradient norm
        and whether the step was taken. A step whose loss or gradient norm is not finite (a gradient that overflowed
        while the loss did not) is skipped, as GradScaler skips one: by the fused Adam(W) on the device (`found_inf`,
        no host sync), by the others after one host sync (its norm logged as NaN). Stepped, an infinite norm would
        scale every gradient by inf / inf = NaN (no clip) or an overflowing one by 0 * inf (a clip): NaN weights from
        then on."""
        grads = [p.grad for p in self.trained if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)  # FSDP2: a DTensor of the global norm
        plain = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        finite = finite & torch.isfinite(plain)
        if self.skip_on_device:
            self.optimizer.found_inf = (~finite).float()
        elif not bool(finite):
            return torch.tensor(float("nan")), finite
        if self.config.train.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.trained, self.config.train.grad_clip, grad_norm)
        self._half_step = (self.step + 1, len(self.trained))  # until train_step counts the step (a replay would
        self.optimizer.step()  # step every parameter twice)
        return grad_norm, finite

    def _check_whole_step(self) -> None:
        """Refuse to step or save after a step that raised once the optimizer had stepped parameters (half way
        through the in-backward steps, train/in_backward.py, or after the step, before it was counted): its weights
        and optimizer states are neither the step's nor the ones before, and a replay would step them twice."""
        if self._half_step is not None:
            step, stepped = self._half_step
            raise RuntimeError(f"step {step} stopped after {stepped} of {len(self.trained)} trained parameters were "
                               "stepped, before the step ended (an error, or a second Ctrl-C): the weights are "
                               "between two steps, and replaying the step would step those parameters twice. Resume "
                               f"from the last checkpoint in {self.config.train.output_dir!r} (run `flamingo train` "
                               "again, or build a new Trainer)")

    def _begin_backward_steps(self, finite: torch.Tensor) -> None:
        """Arm the in-backward steps for this step: skipped where the loss is not finite on every rank."""
        assert self.backward_steps is not None
        if self.skip_on_device:  # fused AdamW skips on the device: no host sync
            self.optimizer.found_inf = (~finite).float()
            self.backward_steps.begin()
        else:
            self.backward_steps.begin(skip=not bool(finite))

    def check_nonfinite(self) -> None:
        """Abort after `train.max_nonfinite` non-finite losses in a row, naming the step that made the streak (a host
        sync: called per logged step when steps are skipped on the device)."""
        streak = int(self.nonfinite_streak)
        if streak >= self.config.train.max_nonfinite:
            raise NonFiniteLossError(f"{streak} non-finite losses in a row at step {self.step}: aborting (lower the "
                                     "lr, check the data)")

    def _token_shares(self, passes: list[tuple[str, dict[str, Any]]]) -> list[torch.Tensor]:
        """Each pass's weight within its dataset's step loss, (): its labelled tokens over the dataset's tokens in
        the step, summed over micro-batches and ranks, times the world size (DDP and FSDP average the ranks'
        gradients). So a dataset's loss is the mean over all its labelled tokens of the step, whatever the split into
        micro-batches and ranks. Counted on the CPU batches (`Flamingo.loss_targets`): no host sync.
        `train.loss_average: passes`: each pass that has a labelled token counts 1 instead (the passes' means
        averaged). A pass without one weighs 0 (its loss is 0, its gradient zero: chunked_loss.py), so the step
        trains on the other passes' tokens; a dataset without any in the step gets 0 / 0 = NaN: a skipped step."""
        counts = torch.tensor([float((self.model.loss_targets(b["labels"], b["input_ids"], b.get("attention_mask"),
                                                              b.get("document_ids")) != -100).sum())
                               for _, b in passes], dtype=torch.float64)  # (passes,)
        if self.config.train.loss_average == "passes":
            counts = (counts > 0).double()
        names = list(dict.fromkeys(name for name, _ in passes))
        index = torch.tensor([names.index(name) for name, _ in passes])
        totals = torch.zeros(len(names), dtype=torch.float64).index_add_(0, index, counts)
        pin = self.device.type == "cuda"  # page-locked + non-blocking: the copies wait for no kernel
        counts, totals, index = ((x.pin_memory() if pin else x).to(self.device, non_blocking=True)
                                 for x in (counts, totals, index))
        if self.world > 1:
            dist.all_reduce(totals)
        shares = counts * self.world / totals[index]  # (passes,)
        return list(shares.float().unbind())

    def _micro_batches(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        k = self.config.train.micro_batches
        if k == 1:
            return [batch]
        size = batch["input_ids"].shape[0]
        if size % k:
            raise ValueError(f"batch of {size} does not split into {k} micro-batches")
        return [{key: v[i * size // k:(i + 1) * size // k] if isinstance(v, torch.Tensor) else v
                 for key, v in batch.items()} for i in range(k)]

    # ---------------------------------------------------------------------------------------------- run
    def _on_signal(self, signum: int, frame: Any) -> None:
        """The first SIGTERM / SIGINT asks for a stop after the current step (with a checkpoint); the handlers from
        before `run` come back at once, so a second signal acts as it would without the trainer (Ctrl-C: a
        KeyboardInterrupt, SIGTERM: the process ends), for a step or a save that does not end."""
        self.stop_signal = signum
        _restore_handlers(self._previous_handlers)

    def _stop_agreed(self) -> bool:
        """Whether any rank got a stop signal: one all-reduce over the ranks at each loop head (on CPU tensors,
        `host_group`), so that all of them leave the loop after the same step and write the checkpoint together (a
        rank left alone in its collectives would hang the job). Records the signal in `stopped_by`."""
        self.stopped_by = max_over_ranks(self.stop_signal, self.host_group)
        return self.stopped_by != 0

    def run(self) -> str:
        """Train to `train.steps`; returns the final model directory. Stopped by a signal (`stopped_by`: its number,
        the largest any rank got) it writes a checkpoint and returns "" (`flamingo train` exits 128 + the number)."""
        t = self.config.train
        # signals are Python's to handle on the main thread only: a run on another thread (a notebook keeping its
        # kernel free) stops by its caller's means, as it would without the trainer
        on_main = threading.current_thread() is threading.main_thread()
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if on_main else {}
        self._previous_handlers = handlers  # what a second signal meets (`_on_signal`)
        self.stop_signal = self.stopped_by = 0  # a run called again after a stop goes on from where it stopped
        # after _resume: the step it resumed at; a run called again on this trainer continues its own logs
        run_log = RunLog(t.output_dir, self.rank, start_step=self.step, resumed=self.resumed or self._runs > 0)
        self._runs += 1
        bar = tqdm(total=t.steps, initial=self.step, disable=self.rank != 0 or not t.progress, desc="train",
                   dynamic_ncols=True)
        peak = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        window_start, window_samples, window_flops = time.perf_counter(), 0, 0.0
        losses = LossWindow(self.sources)  # the losses logged: means over the steps since the last logged one
        try:
            while self.step < t.steps and not self._stop_agreed():  # the same calls on every rank
                metrics = self.train_step()
                window_samples += metrics["samples"]
                window_flops += metrics["flops"]
                losses.add(metrics)
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == 1 or self.step == t.steps:
                    metrics = materialize({**metrics, **losses.take()})  # the window's one host sync
                    self.check_nonfinite()
                    elapsed = time.perf_counter() - window_start
                    metrics["samples_per_s"] = window_samples / elapsed
                    if peak is not None:  # model FLOPs utilisation, all ranks together (flops.py has the formula)
                        metrics["mfu"] = window_flops / elapsed / (peak * self.world)
                    metrics["gates"] = gate_values(self.model)  # collective under FSDP: every rank calls it
                    metrics.update(memory_high_water(self.device))
                    if self.tower_graphs is not None:  # graphs captured so far, calls that could not replay one
                        stats = self.tower_graphs.stats
                        metrics.update(vision_graphs=stats.captured, vision_eager_calls=stats.eager_calls)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    sps=f"{metrics['samples_per_s']:.1f}")
                    run_log.training(metrics)
                    window_start, window_samples, window_flops = time.perf_counter(), 0, 0.0
                if self.validation is not None and (
                        (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps):
                    evaluating = time.perf_counter()
                    run_log.validation(self.step, self.validate())
                    window_start += time.perf_counter() - evaluating  # samples/s counts training time only
                if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps:
                    saving = time.perf_counter()
                    self.save()
                    self._plot()
                    window_start += time.perf_counter() - saving  # samples/s counts training time only
            if self.stopped_by:
                if self._saved_step != self.step:  # a stop right after a save_every step has its checkpoint
                    self.save()  # SIGTERM / SIGINT: a checkpoint before exiting
                    self._plot()
                if self.rank == 0:
                    log.warning("stopped by signal %d at step %d; checkpoint written", self.stopped_by, self.step)
                return ""
        finally:
            bar.close()
            _restore_handlers(handlers)
            run_log.close()
        self._check_trained()
        return self.save_final()

    def _check_trained(self) -> None:
        """Refuse to call a run trained when every one of its steps was skipped as non-finite (fewer than
        `train.max_nonfinite`, so none aborted it): its final model would be the untrained one."""
        skipped = int(self.skipped_steps)
        if self.step and skipped >= self.step:
            raise NonFiniteLossError(f"every one of the run's {self.step} steps had a non-finite loss and was skipped: "
                                     "the model never trained, no final/ written (lower the lr, check the data and "
                                     "the loss weights)")

    def _plot(self) -> None:
        """loss.png and gates.png in the output directory, from the metrics logged so far (rank 0). A picture never
        costs the run: an error drawing it is a warning."""
        if self.rank == 0:
            try:
                plot_run(self.config.train.output_dir, self.model.config.gate_type)
            except Exception as e:  # whatever matplotlib or an odd metrics.jsonl raises
                log.warning("could not draw loss.png / gates.png: %s: %s", type(e).__name__, e)

    def validate(self) -> dict[str, float]:
        """The loss of every validation dataset at the current weights (train/validation.py), in eval mode and
        without gradients, under the training step's autocast and input handling; every rank must call it."""
        if self.validation is None:
            raise ValueError("the config lists no `validation` datasets")

        def batch_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            inputs = {k: v for k, v in self._to_device(batch).items() if k != "vision_cache"}  # kept for training
            with self._autocast():
                out = self.model(**inputs)  # the module itself: no DDP bookkeeping for a forward without backward
            return out.loss, out.loss_tokens

        self.model.eval()
        try:
            with torch.no_grad():
                return self.validation.run(batch_loss, self.device)
        finally:
            self.model.train()

    def save_final(self) -> str:
        self._check_whole_step()
        out = os.path.join(self.config.train.output_dir, "final")
        model = self.model
        if is_sharded(model):  # FSDP: gather the weights (collective), rank 0 saves them on its unsharded copy
            frozen_sharded = self.config.train.fsdp_frozen == "shard"  # (else rank 0 holds them: `unsharded_copy`)
            gathered = gather_all_parameters(model) if frozen_sharded else gather_trained_parameters(model)
            if self.unsharded is not None:
                model = fill_unsharded(self.unsharded, gathered)
        if self.rank == 0:
            trained_only = final_save_trained_only(model, self.config.train.save_trained_only)
            if quantized_mode(model) != "none" and not trained_only:  # never written quantized: the float copies
                self._save_with_float_backbones(model, out)
            else:
                model.save_pretrained(out, trained_only=trained_only, processor=self.processor)
            with open(os.path.join(out, TRAIN_CONFIG_NAME), "w") as f:
                json.dump(asdict(self.config), f, indent=2)
        self.model.name_or_path = out  # what an evaluation of the trained model names it by (eval/runner.py)
        if self.world > 1:
            dist.barrier()
        return out

    def _save_with_float_backbones(self, model: Flamingo, out: str) -> None:
        """The final model saved whole with the float backbones of the whole saved model the run started from
        (`save_pretrained(backbones_from=)`: training changes no frozen weight, and `quantize_frozen` quantizes them
        again as the run did), refused when their files changed since they were loaded: the saved model would not be
        the one trained (the run's last checkpoint keeps the trained weights)."""
        assert self.backbones_from is not None  # (set in __init__ for every run that saves so)
        source, stamps = self.backbones_from
        if backbone_stamps(source) != stamps:
            raise ValueError(f"the backbones in {source} (vision/, lm/) changed while the run trained, so {out} "
                             "cannot take them as the run's frozen weights: the trained weights are in the run's last "
                             f"checkpoint (under {self.config.train.output_dir}); put back the files the run started "
                             "from and run `flamingo train` again, which writes final/ from it without training")
        model.save_pretrained(out, processor=self.processor, backbones_from=source)


def _plain(value: Any) -> Any:
    """A config value as state.json holds it (tuples are JSON lists, also inside lists and mappings)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value


def _restore_handlers(handlers: dict[int, Any]) -> None:
    """Signal handlers back as `signal.signal` returned them (None: one not set from Python, taken as the default)."""
    for number, handler in handlers.items():
        signal.signal(number, signal.SIG_DFL if handler is None else handler)
