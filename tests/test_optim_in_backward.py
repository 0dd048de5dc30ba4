"""`optim.in_backward`: the optimizer steps each trained parameter inside backward and frees its gradient. The run
equals the run that steps after backward (losses, weights, logged gradient norm), with 8-bit states and with
activation checkpointing too; a checkpoint of either resumes exactly under the other; non-finite losses skip the
steps; what it cannot do is refused; FSDP over two processes equals one process."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flamingo.train.config import check_in_backward, load_config
from flamingo.train.run_log import materialize
from flamingo.train.trainer import Trainer

from train_fixtures import nan_losses_after_the_first_step, train_config, write_datasets

TESTS = os.path.dirname(os.path.abspath(__file__))



def _config(world, name: str, steps: int = 4, **overrides):
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=steps, out=os.path.join(root, name), interleaved=False,
                        grad_clip=0)
    return load_config(path, [f"{k}={v}" for k, v in overrides.items()])


def _trained(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _steps(trainer: Trainer, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        out.append(materialize(trainer.train_step()))
        assert all(p.grad is None for p in trainer.trained) or trainer.backward_steps is None
    return out


@pytest.mark.parametrize("variant", ["adamw", "fused", "checkpointing",
                                     pytest.param("adamw8bit", marks=pytest.mark.slow)])
def test_steps_in_backward_equal_steps_after_backward(world, variant):
    overrides = {"optim.kind": "adamw8bit"} if variant == "adamw8bit" else {}
    if variant == "adamw8bit":
        pytest.importorskip("torchao")
    if variant == "fused":
        overrides["optim.fused"] = "true"
    if variant == "checkpointing":
        overrides["train.gradient_checkpointing"] = "true"
    after = Trainer(_config(world, f"after-{variant}", **overrides))
    inside = Trainer(_config(world, f"inside-{variant}", **{**overrides, "optim.in_backward": "true"}))
    assert after.backward_steps is None and inside.backward_steps is not None
    a, b = _steps(after, 4), _steps(inside, 4)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)  # summed in another order
    wa, wb = _trained(after), _trained(inside)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(wb[n], p) for n, p in _trained(Trainer(_config(world, "fresh"))).items())
    state_a = after.optimizer.state_dict()["state"]
    state_b = inside.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and all(float(state_b[k]["step"]) == 4 for k in state_b)


def test_no_two_trained_gradients_are_alive_together(world):
    """The point of the option: when a gradient arrives, every other trained parameter's is freed or not yet made
    (stepping after backward, all of them are alive at its end)."""
    alive = {}
    for mode in ("false", "true"):
        trainer = Trainer(_config(world, f"alive-{mode}", **{"optim.in_backward": mode}))
        seen: list[int] = []
        handles = [p.register_hook(lambda g: seen.append(sum(q.grad is not None for q in trainer.trained)))
                   for p in trainer.trained]
        trainer.train_step()
        for handle in handles:
            handle.remove()
        alive[mode] = max(seen)
    assert alive["true"] == 0 and alive["false"] == len(trainer.trained) - 1


def test_a_backward_that_raises_half_way_is_not_replayed_or_saved(world):
    """A backward that raised after some in-backward steps (an error, a second Ctrl-C) left them applied; `run()` again
    replayed the step and stepped those parameters twice. Training and saving from there are refused; the checkpoint
    resumes the run exactly."""
    straight = Trainer(_config(world, "half-straight", **{"optim.in_backward": "true"}))
    expected = _steps(straight, 3)
    trainer = Trainer(_config(world, "half", **{"optim.in_backward": "true"}))
    _steps(trainer, 1)
    trainer.save()
    steps, hook, raised = trainer.backward_steps, trainer.backward_steps._step, []

    def raises_at_the_third(p):
        if steps.stepped == 2 and not raised:
            raised.append(1)
            raise KeyboardInterrupt
        hook(p)

    steps._step = raises_at_the_third
    for handle in steps.handles:
        handle.remove()
    steps.handles = [p.register_post_accumulate_grad_hook(lambda q: steps._step(q)) for p in trainer.trained]
    with pytest.raises(KeyboardInterrupt):
        trainer.train_step()
    for call in (trainer.train_step, trainer.save, trainer.run):
        with pytest.raises(RuntimeError, match=f"step 2 stopped after 2 of {len(trainer.trained)} trained "
                                               "parameters were stepped, before the step ended"):
            call()
    resumed = Trainer(_config(world, "half", **{"optim.in_backward": "true"}))
    assert resumed.step == 1
    later = _steps(resumed, 2)
    assert [m["loss"] for m in later] == pytest.approx([m["loss"] for m in expected[1:]], rel=1e-6, abs=1e-7)
    for name, value in _trained(straight).items():
        torch.testing.assert_close(_trained(resumed)[name], value, atol=1e-6, rtol=1e-5, msg=name)
    raised = Trainer(_config(world, "half-forward", **{"optim.in_backward": "true"}))  # before any step: replayed
    forward, calls = raised.model.xattn[0].forward, []

    def raises_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    raised.model.xattn[0].forward = raises_once
    with pytest.raises(KeyboardInterrupt):
        raised.train_step()
    assert materialize(raised.train_step())["loss"] == pytest.approx(expected[0]["loss"], rel=1e-6, abs=1e-7)


def test_a_checkpoint_resumes_exactly_with_the_option_switched(world):
    """Two steps after backward, a checkpoint, two steps inside backward: the four steps of either mode alone."""
    straight = Trainer(_config(world, "straight"))
    expected = _steps(straight, 4)
    first = Trainer(_config(world, "switched"))
    _steps(first, 2)
    first.save()
    resumed = Trainer(_config(world, "switched", **{"optim.in_backward": "true"}))
    assert resumed.step == 2
    later = _steps(resumed, 2)
    assert [m["loss"] for m in later] == pytest.approx([m["loss"] for m in expected[2:]], rel=1e-6, abs=1e-7)
    wa, wb = _trained(straight), _trained(resumed)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_losses_skip_the_steps_in_backward(world, monkeypatch, fused):
    config = _config(world, f"nan-{fused}", steps=10, **{"optim.in_backward": "true", "train.max_nonfinite": 5})
    config.optim.fused = fused
    trainer = Trainer(config)
    nan_losses_after_the_first_step(trainer, monkeypatch)  # step 1 is fine, then every loss is NaN
    before = _trained(trainer)
    trainer.train_step()
    good = _trained(trainer)
    assert any(not torch.equal(before[n], good[n]) for n in before)
    moments = {k: v.clone() for k, v in trainer.optimizer.state[trainer.trained[0]].items()}
    for _ in range(2):
        metrics = materialize(trainer.train_step())
        assert all(torch.equal(p, good[n]) for n, p in _trained(trainer).items())
        state = trainer.optimizer.state[trainer.trained[0]]
        assert all(torch.equal(state[k], v) for k, v in moments.items())
        assert all(p.grad is None for p in trainer.trained)
    assert metrics["skipped_nonfinite"] == 2 and math.isnan(metrics["loss"])


def test_what_steps_in_backward_cannot_do_is_refused(world):
    root, vision, lm, data = world
    two_datasets = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "refused"), grad_clip=0)
    with pytest.raises(ValueError, match="set train.grad_clip: 0"):
        _config(world, "r1", **{"optim.in_backward": "true", "train.grad_clip": 1.0})
    with pytest.raises(ValueError, match="cannot accumulate"):
        _config(world, "r2", **{"optim.in_backward": "true", "train.micro_batches": 2})
    with pytest.raises(ValueError, match="cannot accumulate"):
        load_config(two_datasets, ["optim.in_backward=true"])
    load_config(two_datasets, ["optim.in_backward=true", "train.mixture=sample"])  # one dataset per step: fine
    load_config(two_datasets, ["optim.in_backward=true", "data.1.loss_weight=0"])  # a weight-0 one is never read
    config = _config(world, "r3", **{"optim.in_backward": "true"})
    with pytest.raises(ValueError, match="use train.distributed: fsdp"):
        check_in_backward(config, world=2, distributed="ddp")
    check_in_backward(config, world=2, distributed="fsdp")
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        _config(world, "r4", **{"train.grad_clip": -1})


def test_no_clipping_logs_the_norm_and_leaves_the_gradients_whole(world):
    """train.grad_clip: 0 turns clipping off (it once meant a max norm of 0: every gradient zeroed)."""
    trainer = Trainer(_config(world, "noclip"))
    before = _trained(trainer)
    metrics = materialize(trainer.train_step())
    assert metrics["grad_norm"] > 0 and math.isfinite(metrics["grad_norm"])
    assert any(not torch.equal(before[n], p) for n, p in _trained(trainer).items())


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_processes_stepping_in_backward_equal_one_process(world, tmp_path):
    """FSDP2 calls the hooks itself after its reduce-scatter, on each rank's shard: two processes stepping inside
    backward train what one process with the doubled batch trains stepping after backward."""
    root, vision, lm, _ = world
    data = write_datasets(str(tmp_path / "same"), n_pairs=32, same_caption=True)
    config = train_config(str(tmp_path), vision, lm, data, steps=3, out=str(tmp_path / "unused"), batch_size=2,
                          interleaved=False, grad_clip=0)
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29523",
                             os.path.join(TESTS, "ddp_worker.py"), config, two, "train.distributed=fsdp",
                             "optim.in_backward=true"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = subprocess.run([sys.executable, os.path.join(TESTS, "ddp_worker.py"), config, one, "--single"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    def logged(out: str) -> dict[int, dict]:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return {m["step"]: m for m in map(json.loads, f)}

    a, b = logged(two), logged(one)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5, (step, a[step]["loss"], b[step]["loss"])
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4)
    ranks = [load_file(os.path.join(two, f"params_rank{r}.safetensors")) for r in range(2)]
    alone = load_file(os.path.join(one, "params_rank0.safetensors"))
    assert ranks[0].keys() == ranks[1].keys() == alone.keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) and torch.allclose(alone[k], ranks[0][k], atol=1e-5)
               for k in alone)
