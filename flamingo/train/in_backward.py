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
each rank's shard of the reduced gradient: that works (the non-finite check below is or-ed over the shards).

A parameter whose gradient is not finite (an inf or NaN, or an element whose square overflows float32, which would
make Adam's second moment inf) is not stepped: its gradient is dropped, as GradScaler skips a step, and the step's
summed squares, hence its logged norm, are not finite either, which is how the trainer can tell. The others step:
they may have stepped already when the bad gradient arrives. The fused AdamW skips it on the device (its `found_inf`
for that one call, no host sync); any other optimizer after one host sync per parameter.

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
    backward (skip=True drops the gradients without stepping: a non-finite loss; the fused AdamW's skip is its
    `found_inf`, set before `begin`), `grad_norm()` after it. A parameter whose gradient is not finite is not
    stepped (module docstring)."""

    def __init__(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        # the fused Adam(W) skips a step on the device when its `found_inf` is 1 (GradScaler's protocol)
        self.on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self.skip: bool = False
        self.found_inf: Optional[torch.Tensor] = None  # () float, the step's own (a non-finite loss), fused only
        self.squares: Optional[torch.Tensor] = None  # () fp32 sum of this step's squared gradients (this rank's)
        self.stepped = 0  # parameters this step has stepped so far: a backward that raises leaves a half step
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in params]

    def begin(self, skip: bool = False) -> None:
        self.skip, self.squares, self.stepped = skip, None, 0
        self.found_inf = getattr(self.optimizer, "found_inf", None) if self.on_device else None

    def _step(self, p: torch.Tensor) -> None:
        grad = p.grad
        assert grad is not None
        local = grad.to_local() if hasattr(grad, "to_local") else grad  # FSDP2: this rank's shard of the reduced grad
        square = local.detach().float().square().sum()
        self.squares = square if self.squares is None else self.squares + square
        if not self.skip:
            bad = ~torch.isfinite(square)  # () an inf / NaN, or a square past float32's range
            if local is not grad:  # FSDP2: one rank's shard is bad, so is the parameter on every rank
                bad = _on_any_shard(bad, grad)
            if self.on_device:  # skipped inside the kernel for this call: no host sync
                self.optimizer.found_inf = bad.float() if self.found_inf is None else \
                    torch.maximum(self.found_inf, bad.float())
                self.optimizer.step()  # steps p alone: no other parameter holds a gradient now
                self.optimizer.found_inf = self.found_inf
                self.stepped += 1
            elif not bool(bad):  # one host sync per parameter
                self.optimizer.step()
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


def _on_any_shard(flag: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`flag` (a () bool of this rank's shard of the DTensor `grad`) or-ed over the ranks of its mesh: a parameter is
    stepped whole or not at all, and its optimizer state (step count included) stays one state. A collective: every
    rank's hook for the parameter calls it, in the same order (FSDP2 runs them after the same reduce-scatters)."""
    if not dist.is_initialized():
        return flag
    mesh = grad.device_mesh  # type: ignore[attr-defined]
    group = mesh.get_group() if mesh.ndim == 1 else None  # (HSDP: the replicas hold the same shard; all ranks)
    flag = flag.float()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag.bool()

