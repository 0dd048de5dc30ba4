"""Validation loss on held-out datasets during training (`validation:` in the config, `train.eval_every`).

Each evaluation reads every validation dataset from the same start (its source's state at construction is loaded
back first, and shuffling is off unless the config turns it on), so successive evaluations see the same batches:
`train.eval_batches` of them, or the whole set (its last partial batch too, unless `drop_last` is set). A set that
gives no batch fails when the trainer starts. The loss of a dataset is the mean over all its labelled tokens (each
batch's mean weighted by its token count, summed over ranks), not a mean of batch means.

Under torchrun every rank reads its own shard and the ranks step together: each batch starts with an all-reduce of
whether every rank still has one (FSDP's forward is collective), and the evaluation of a dataset ends when one rank
runs out. `val_batches/<name>` says how many batches were read over all ranks, so a shortened pass is visible.
`max_batches` (`train.eval_batches`) counts the ranks' steps together: each rank reads that many of its batches.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.build import DatasetSource

# one batch's (mean loss, labelled tokens) from the model, under the trainer's autocast and input handling
BatchLoss = Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


class Validation:
    def __init__(self, sources: dict[str, DatasetSource], *, max_batches: int = 0, world: int = 1,
                 progress: bool = False) -> None:
        self.sources = sources
        self.max_batches = max_batches
        self.world = world
        self.progress = progress  # a tqdm bar per dataset (rank 0's trainer passes train.progress)
        self._starts = {name: copy.deepcopy(source.state_dict()) for name, source in sources.items()}
        for name in sources:  # a set with no batch fails now, with the source's clear error, not at the first
            next(self._batches(name), None)  # evaluation many steps into training

    def _batches(self, name: str) -> Iterator[dict[str, Any]]:
        source = self.sources[name]
        source.load_state_dict(copy.deepcopy(self._starts[name]))
        for i, batch in enumerate(source):
            if self.max_batches and i >= self.max_batches:
                return
            yield batch

    def run(self, batch_loss: BatchLoss, device: torch.device) -> dict[str, float]:
        """{`val_loss/<name>`, `val_tokens/<name>`, `val_batches/<name>`} for every validation dataset."""
        out: dict[str, float] = {}
        for name in self.sources:
            total = torch.zeros(3, dtype=torch.float64, device=device)  # summed loss x tokens, tokens, batches
            batches = self._batches(name)
            # a context: closed when a batch raises (an interrupted run), so later bars keep their line
            with tqdm(total=self.max_batches or None, desc=f"validate {name}", disable=not self.progress,
                      dynamic_ncols=True, leave=False) as bar:
                while True:
                    batch = next(batches, None)
                    if self.world > 1:  # every rank must have a batch, or none runs its (collective) forward
                        have = torch.tensor(float(batch is not None), device=device)
                        dist.all_reduce(have, op=dist.ReduceOp.MIN)
                        if have.item() == 0:
                            break
                    elif batch is None:
                        break
                    loss, tokens = batch_loss(batch)
                    tokens = tokens.double()
                    weighted = torch.where(tokens > 0, loss.detach().double() * tokens, 0.0)  # no token: nan mean
                    total += torch.stack([weighted, tokens, torch.ones((), dtype=torch.float64, device=device)])
                    bar.update(1)
            if self.world > 1:
                dist.all_reduce(total)
            loss_sum, tokens, read = total.tolist()
            out[f"val_loss/{name}"] = loss_sum / tokens if tokens else float("nan")
            out[f"val_tokens/{name}"] = tokens
            out[f"val_batches/{name}"] = read
        return out
