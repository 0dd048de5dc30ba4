"""The optimizer step inside backward (`optim.in_backward`): each trained parameter is updated as soon as its gradient
is complete, and that gradient is freed at once, so a step never holds the gradients of all trained parameters
together. They weigh what the trained parameters weigh (fp32: 3.6 GB at bench.memory's gpu shape), the largest
memory term after the optimizer states once the frozen backbones are quantized. It is torchtune's `optimizer_in_bwd`
and PyTorch's recipe "How to save memory by fusing the optimizer step into the backward pass", kept on the one
optimizer the trainer already has: its param groups, LR schedule and checkpointed state are unchanged, so resume stays
exact and a run may switch the option between restarts.

How: a post-accumulate-grad hook per trained parameter calls `optimizer.step()` and then drops the gradient. The
optimizer steps only parameters that hold a gradient, and at that moment only this one does: the others are not
computed yet, or were stepped and dropped by their own hooks (the step starts with no gradients at all).

What it rules out, refused by the config and the trainer: a clip of the global gradient norm (each parameter steps
before the norm over all of them exists; the norm is still summed as the hooks run and logged), gradient accumulation
(micro-batches, the `accumulate` mixture over several datasets), and DDP (its reducer all-reduces a gradient after the
parameter's hook has already stepped on the local one). FSDP2 runs these hooks itself, after its reduce-scatter, on
each rank's shard of the reduced gradient: that works.

A step is not atomic: a backward that raises (an error in a hook, a second Ctrl-C) leaves some parameters stepped
and the others not. Replaying the step would step those twice, and no copy of the weights from before the step is
kept (it would cost the memory the option saves), so the trainer refuses to go on or save from there: the last
checkpoint resumes exactly.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn


class BackwardSteps:
    """Hooks that step `optimizer` on each of `params` inside backward. Per training step: `begin(skip)` before the
    backward (skip=True drops the gradients without stepping: a non-finite loss), `grad_norm()` after it."""

    def __init__(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.skip: bool = False
        self.squares: Optional[torch.Tensor] = None  # () fp32 sum of this step's squared gradients (this rank's)
        self.stepped = 0  # parameters this step has stepped so far: a backward that raises leaves a half step
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in params]

    def begin(self, skip: bool = False) -> None:
        self.skip, self.squares, self.stepped = skip, None, 0

    def _step(self, p: torch.Tensor) -> None:
        grad = p.grad
        assert grad is not None
        local = grad.to_local() if hasattr(grad, "to_local") else grad  # FSDP2: this rank's shard of the reduced grad
        square = local.detach().float().square().sum()
        self.squares = square if self.squares is None else self.squares + square
        if not self.skip:
            self.optimizer.step()  # steps p alone: no other parameter holds a gradient now
            self.stepped += 1
        p.grad = None

    def grad_norm(self, sharded: bool = False) -> torch.Tensor:
        """The global L2 norm of this step's gradients (NaN if no hook ran); sharded: summed over the ranks' shards
        (a collective: every rank calls it)."""
        squares = self.squares
        if squares is None:
            return torch.tensor(float("nan"))
        if sharded and dist.is_initialized():
            squares = squares.clone()
            dist.all_reduce(squares)
        return squares.sqrt()
