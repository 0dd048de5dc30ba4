"""`optim.in_backward` under a finite loss whose backward makes a non-finite gradient: that parameter is not stepped
(no NaN reaches its weight or its optimizer state), the others are, and the step's logged norm is not finite."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from flamingo.train.config import load_config
from flamingo.train.in_backward import BackwardSteps
from flamingo.train.run_log import materialize
from flamingo.train.trainer import Trainer

from train_fixtures import train_config


def _overflowing(p: torch.Tensor, value: float) -> None:
    """`p`'s gradient becomes `value` everywhere (a tensor hook runs before the post-accumulate-grad hook)."""
    p.register_hook(lambda g: torch.full_like(g, value))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e30])  # 1e30: finite, its square is not
def test_a_non_finite_gradient_is_not_stepped(fused, value):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=fused)
    steps = BackwardSteps(list(layer.parameters()), optimizer)
    _overflowing(layer.bias, value)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    steps.begin()
    layer(torch.randn(2, 4)).sum().backward()
    assert torch.equal(layer.bias, bias)  # not stepped
    assert not torch.equal(layer.weight, weight) and bool(torch.isfinite(layer.weight).all())
    assert all(bool(torch.isfinite(t).all()) for state in optimizer.state.values() for t in state.values())
    if fused:  # the skip on the device leaves the state made, at step 0 (GradScaler's skip)
        assert float(optimizer.state[layer.bias]["step"]) == 0
    else:
        assert layer.bias not in optimizer.state or not optimizer.state[layer.bias]
    assert float(optimizer.state[layer.weight]["step"]) == 1
    assert steps.stepped == (2 if fused else 1) and layer.bias.grad is None
    assert not math.isfinite(float(steps.grad_norm()))
    assert getattr(optimizer, "found_inf", None) is None  # the step's own skip, not the parameter's, stays


@pytest.mark.parametrize("fused", [False, True])
def test_the_loss_skip_still_holds_on_the_device(fused):
    """A non-finite loss (the trainer's `found_inf` for the fused AdamW, `skip` for the others) skips every
    parameter, finite gradients included; the next step steps them."""
    layer = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=fused)
    steps = BackwardSteps(list(layer.parameters()), optimizer)
    before = [p.detach().clone() for p in layer.parameters()]
    if fused:
        optimizer.found_inf = torch.ones(())
    steps.begin(skip=not fused)
    layer(torch.randn(2, 4)).sum().backward()
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))
    optimizer.found_inf = torch.zeros(()) if fused else None
    steps.begin()
    layer(torch.randn(2, 4)).sum().backward()
    assert all(not torch.equal(p, b) for p, b in zip(layer.parameters(), before))


@pytest.mark.parametrize("fused", ["false", "true"])
def test_a_run_whose_gradient_overflows_keeps_finite_weights(world, fused):
    """The trainer's tiny run, in backward, with one gate's gradient inf at the first step (the loss is finite):
    that gate is unchanged by the step, every other trained tensor steps, nothing is NaN after three steps."""
    root, vision, lm, data = world
    config = load_config(train_config(root, vision, lm, data, steps=3, out=os.path.join(root, f"inf-{fused}"),
                                      interleaved=False, grad_clip=0),
                         ["optim.in_backward=true", f"optim.fused={fused}"])
    trainer = Trainer(config)
    gate = trainer.model.xattn[0].ffw_gate
    calls = {"n": 0}

    def overflow(g: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.full_like(g, float("inf")) if calls["n"] == 1 else g

    gate.register_hook(overflow)
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    first = materialize(trainer.train_step())
    assert torch.equal(gate, before["xattn.0.ffw_gate"])
    steps = {n: float(trainer.optimizer.state[p]["step"]) if trainer.optimizer.state.get(p) else 0.0
             for n, p in trained.items()}
    assert steps.pop("xattn.0.ffw_gate") == 0 and set(steps.values()) == {1.0}  # every other one stepped
    assert not math.isfinite(first["grad_norm"]) and math.isfinite(first["loss"])
    assert first["skipped_nonfinite"] == 1  # counted, as the other paths count a skipped step
    for _ in range(2):
        later = materialize(trainer.train_step())
        assert math.isfinite(later["loss"]) and later["skipped_nonfinite"] == 1
    assert all(bool(torch.isfinite(p).all()) for p in trained.values())
    assert not torch.equal(gate, before["xattn.0.ffw_gate"])  # the later steps step it


def _shard_worker(rank: int, world: int, rendezvous: str, fused: bool, out: str) -> None:
    """One rank of `nn.Linear(4, 2)` under FSDP2 (a row of the weight and an element of the bias per rank), stepped in
    backward with output 1's gradient inf: only rank 1's shard is non-finite."""
    import json

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{rendezvous}")
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        layer = nn.Linear(4, 2)
        fully_shard(layer)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=fused)
        steps = BackwardSteps(list(layer.parameters()), optimizer)
        before = {n: p.full_tensor().clone() for n, p in layer.named_parameters()}
        if fused:
            optimizer.found_inf = torch.zeros(())
        steps.begin()
        output = layer(torch.ones(3, 4))
        output.register_hook(lambda g: torch.cat([g[:, :1], torch.full_like(g[:, 1:], float("inf"))], 1))
        output.sum().backward()
        norm = float(steps.grad_norm(sharded=True))
        changed = {n: bool((p.full_tensor() != before[n]).any()) for n, p in layer.named_parameters()}
        counts = {n: float(optimizer.state[p]["step"]) if optimizer.state.get(p) else 0.0
                  for n, p in layer.named_parameters()}
        with open(f"{out}-{rank}.json", "w") as f:
            json.dump({"norm": norm, "changed": changed, "steps": counts}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("fused", [False, True])
def test_under_fsdp2_a_parameter_bad_on_one_shard_is_stepped_on_none(tmp_path, fused):
    """The skip is or-ed over the shards: a parameter is stepped whole or not at all, its Adam step count one count
    (rank 0 stepped its half and counted 1, rank 1 not, and a checkpoint gathered rank 0's count for the whole)."""
    import json

    torch.multiprocessing.start_processes(_shard_worker, args=(2, str(tmp_path / "rendezvous"), fused,
                                                               str(tmp_path / "rank")), nprocs=2, start_method="fork")
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert not math.isfinite(seen["norm"])
        assert seen["changed"] == {"weight": False, "bias": False}
        assert set(seen["steps"].values()) == {0.0}
