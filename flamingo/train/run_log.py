"""What a training run writes down: `metrics.jsonl` and TensorBoard scalars (rank 0), a step's metrics read from the
device in one sync, the tanh gates the paper plots, and the memory high-water.

Each logged training step is one JSON line (the losses as means over the steps since the previous logged one, with
the samples behind each dataset's: `LossWindow`; lr, grad norm, samples/s, MFU on a known GPU, gates, memory); each
validation pass one more (`val_loss/<name>`, ...). A non-finite number (the loss of a skipped step) is
written as `null`: strict JSON, which jq and JavaScript read (plots.read_metrics reads it back as NaN). The same
numbers go to TensorBoard under `tb/` when tensorboard is installed (gates as `gates/attn/<layer>` and
`gates/ffw/<layer>`).

The logs are the run's own: a fresh run moves a previous run's logs aside (`metrics.prev-<N>.jsonl`, `tb.prev-<N>`,
and the pictures drawn from them), so that its curves never carry another run's points; a resumed run drops what the
attempt it resumes from logged after its checkpoint (metrics.jsonl's records past the step; TensorBoard's events, by
`purge_step`), since those steps are trained again.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch

from ..runtime import status_kib
from ..runtime.checkpoint_io import atomic_file
from ..runtime.json_values import json_safe

if TYPE_CHECKING:  # annotations only
    from ..model.flamingo import Flamingo

log = logging.getLogger(__name__)


class RunLog:
    """The run's metrics file and TensorBoard writer. Every rank may call it; only rank 0 writes."""

    def __init__(self, output_dir: str, rank: int, *, start_step: int, resumed: Optional[bool] = None) -> None:
        """start_step: the step the run starts from (the checkpoint's it resumed from, else 0); resumed: whether it
        resumed from a checkpoint (default: start_step > 0; a run stopped before its first step leaves one of step
        0)."""
        self.rank = rank
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        if rank != 0:
            return
        if not (start_step > 0 if resumed is None else resumed):
            moved = set_aside_previous_logs(output_dir)
            if moved:
                log.warning(
                    "%s held the logs of another run (no checkpoint to resume from): moved to %s",
                    output_dir,
                    ", ".join(moved),
                )
        else:
            dropped = drop_records_after(self.metrics_path, start_step)
            if dropped:
                log.info(
                    "%s: %d record(s) past the resumed step %d removed (that attempt's, trained again)",
                    self.metrics_path,
                    dropped,
                    start_step,
                )
        # a resumed run's TensorBoard drops the events the earlier attempt wrote from step start_step + 1 on
        self.writer = _tensorboard(os.path.join(output_dir, "tb"), start_step + 1 if start_step or resumed else None)

    def training(self, metrics: dict[str, Any]) -> None:
        """One logged step's materialized metrics (with "step" and "gates")."""
        if self.rank != 0:
            return
        self._append(metrics)
        if self.writer is None:
            return
        step = metrics["step"]
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        for layer, (attn, ffw) in metrics["gates"].items():
            self.writer.add_scalar(f"gates/attn/{layer}", attn, step)
            self.writer.add_scalar(f"gates/ffw/{layer}", ffw, step)

    def validation(self, step: int, values: dict[str, float]) -> None:
        """One validation pass: `val_loss/<name>`, `val_tokens/<name>`, `val_batches/<name>`."""
        if self.rank != 0:
            return
        self._append({"step": step, **values})
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in values.items() if "loss" in k))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def _tensorboard(directory: str, purge_step: Optional[int]) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(directory, purge_step=purge_step)


# what a run writes about its curves: metrics.jsonl, the TensorBoard directory and plots.py's pictures
LOG_NAMES = ("metrics.jsonl", "tb", "loss.png", "gates.png")


def set_aside_previous_logs(output_dir: str) -> list[str]:
    """Rename the logs a previous run left in `output_dir` to `<name>.prev-<N>[.<ext>]`, N the first number free for
    all of them (one N per previous run); returns the new names."""
    present = [name for name in LOG_NAMES if os.path.exists(os.path.join(output_dir, name))]
    if not present:
        return []

    def aside(name: str, n: int) -> str:
        stem, ext = os.path.splitext(name)
        return f"{stem}.prev-{n}{ext}"

    n = 1
    while any(os.path.exists(os.path.join(output_dir, aside(name, n))) for name in LOG_NAMES):
        n += 1
    for name in present:
        os.replace(os.path.join(output_dir, name), os.path.join(output_dir, aside(name, n)))
    return [aside(name, n) for name in present]


def drop_records_after(path: str, step: int) -> int:
    """Rewrite `metrics.jsonl` at `path` (atomically) without the records past `step` and the lines that are no
    step's record (one torn by a killed run would swallow the next record appended to it); returns how many lines
    went."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()

    def kept(line: str) -> bool:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step

    keep = [line for line in lines if kept(line)]
    if len(keep) == len(lines) and (not lines or lines[-1].endswith("\n")):
        return 0
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)
    return len(lines) - len(keep)


class LossWindow:
    """The training losses a logged step writes: `loss` and each `loss/<name>` as the mean over the steps since the
    previous logged step that computed it (every step for `loss`; in `sample` mode a dataset's loss only on the steps
    that drew it), and `samples/<name>`, the samples behind that mean (all ranks'; 0 for a dataset the window did
    not read). Without it a dataset drawn on few steps would show only when drawn on the logged step itself.

    A non-finite step loss (a skipped step's) is left out of its mean; a mean over no finite loss is NaN (written as
    null). Sums and counts stay on the device, so a step adds no host sync (`materialize` reads them at the log).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = list(names)  # every dataset: each logs its samples/<name>, 0 where the window read none
        self._start()

    def _start(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.samples: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        """One step's metrics (`Trainer.train_step`): `loss`, `loss/<name>` (device tensors) and `samples/<name>`."""
        for key, value in metrics.items():
            if key != "loss" and not key.startswith("loss/"):
                continue
            finite = torch.isfinite(value)  # () bool on the device
            self.sums[key] = self.sums.get(key, 0.0) + torch.where(finite, value.detach(), 0.0)
            self.counts[key] = self.counts.get(key, 0) + finite.long()
            if key.startswith("loss/"):
                name = key[len("loss/") :]
                self.samples[name] = self.samples.get(name, 0) + finite.long() * metrics[f"samples/{name}"]

    def take(self) -> dict[str, Any]:
        """The window's means and sample counts (device tensors, ints for datasets it did not read); starts the
        next window."""
        out: dict[str, Any] = {key: self.sums[key] / self.counts[key] for key in self.sums}  # 0 / 0: NaN
        out.update({f"samples/{name}": self.samples.get(name, 0) for name in self.names})
        self._start()
        return out


def materialize(metrics: dict[str, Any]) -> dict[str, Any]:
    """A step's metrics with its device tensors read as Python numbers (one host sync for all of them). Every rank
    calls it at the same steps (a sharded grad norm is gathered)."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(metrics)
    tensors = [metrics[k].detach() for k in keys]
    tensors = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]  # FSDP's grad norm: collective
    values = torch.stack([t.to(tensors[0].device, torch.float64) for t in tensors]).tolist()
    out = dict(metrics)
    for k, v in zip(keys, values):
        out[k] = v if metrics[k].is_floating_point() else int(v)  # counters stay integers
    return out


def gate_values(model: Flamingo) -> dict[str, tuple[float, float]]:
    """LM layer -> (tanh attention gate, tanh dense gate), which the paper plots over training; FSDP-sharded gates
    are all-gathered first. Vector gates (`gate_type="vector"`) give the mean |tanh| over channels: their signs differ
    from channel to channel, so a signed mean would hide how far they opened."""
    if not model.config.gated:
        return {}

    def value(p: torch.Tensor) -> float:
        full = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tanh()
        return float(full) if full.numel() == 1 else float(full.abs().mean())

    return {str(i): (value(b.attn_gate), value(b.ffw_gate)) for i, b in zip(model.xattn_layer_indices, model.xattn)}


def memory_high_water(device: torch.device) -> dict[str, float]:
    """This rank's memory high-water: on CUDA the window's peak of tensor memory (then reset), on the CPU the
    process's peak resident set since it started (Linux's VmHWM)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return {"peak_memory_gib": peak}
    kib: Optional[int] = status_kib("VmHWM")
    return {} if kib is None else {"max_rss_gib": kib / 2**20}
