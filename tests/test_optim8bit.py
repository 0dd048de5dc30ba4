"""8-bit AdamW states (`optim.kind: adamw8bit`, torchao): the same param groups as AdamW, states stored without
pickle (codes and scales as plain tensors), and exact resume: N/2 steps, a checkpoint, a new trainer, N/2 more steps
== N steps straight, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from flamingo.train import state_codec
from flamingo.train.config import load_config, parse_config
from flamingo.train.optim import make_optimizer, make_scheduler
from flamingo.train.trainer import Trainer

from train_fixtures import train_config, write_datasets

TESTS = os.path.dirname(os.path.abspath(__file__))

pytest.importorskip("torchao")


class _Toy(nn.Module):
    """Parameter names as Flamingo's: an xattn block (matrix, bias, gates) and a resampler row."""

    def __init__(self) -> None:
        super().__init__()
        self.xattn = nn.ModuleList([nn.Module()])
        self.xattn[0].ffw = nn.Linear(64, 128)  # 8192 values: an 8-bit state (torchao quantizes >= 4096)
        self.xattn[0].attn_gate = nn.Parameter(torch.zeros(1))
        self.xattn[0].ffw_gate = nn.Parameter(torch.zeros(1))
        self.resampler = nn.Linear(4, 4)


def test_adamw8bit_keeps_the_param_groups_of_adamw():
    model = _Toy()
    kwargs = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, gate_lr_mult=10.0, attn_gate_lr_mult=2.0)
    plain, eight = make_optimizer(model, **kwargs), make_optimizer(model, kind="adamw8bit", **kwargs)
    assert type(eight).__name__ == "AdamW8bit"
    for a, b in zip(plain.param_groups, eight.param_groups, strict=True):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        assert a["weight_decay"] == b["weight_decay"] and float(a["lr"]) == pytest.approx(float(b["lr"]))
        assert tuple(b["betas"]) == (0.9, 0.95)


def test_bad_optimizer_kinds_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown optimizer kind 'sgd'"):
        make_optimizer(_Toy(), 1e-3, 0.1, (0.9, 0.999), 1e-8, kind="sgd")
    with pytest.raises(ValueError, match="does not apply to optim.kind=adamw8bit"):
        make_optimizer(_Toy(), 1e-3, 0.1, (0.9, 0.999), 1e-8, fused=True, kind="adamw8bit")
    raw = {"data": [{"name": "d", "kind": "pairs", "path": "x"}]}
    with pytest.raises(ValueError, match="optim.kind must be adamw or adamw8bit"):
        parse_config({**raw, "optim": {"kind": "adam4bit"}})
    with pytest.raises(ValueError, match="does not apply to optim.kind=adamw8bit"):
        parse_config({**raw, "optim": {"kind": "adamw8bit", "fused": True}})
    assert parse_config({**raw, "optim": {"kind": "adamw8bit"}}).optim.kind == "adamw8bit"


def test_8bit_states_and_tensor_learning_rates_round_trip_without_pickle():
    """The codec writes an OptimState8bit as its uint8 codes, fp32 scales and qmap, and rebuilds the same bytes;
    tuples, int-keyed dicts and torchao's tensor learning rates (in the scheduler's state too) come back as they
    were."""
    from torchao.optim.subclass_8bit import OptimState8bit

    state8 = OptimState8bit.zeros((32, 256), signed=True, block_size=256)
    state8.copy_(torch.randn(32, 256))  # quantizes
    tree = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": state8}},
            "param_groups": [{"lr": torch.tensor(1e-3), "betas": (0.9, 0.999), "params": [0], "name": None}]}
    skeleton, tensors = state_codec.encode(tree, "optimizer")
    assert tensors["optimizer/state/0/exp_avg/codes"].dtype == torch.uint8
    assert all(type(t) is torch.Tensor for t in tensors.values())
    back = state_codec.decode(skeleton, tensors)
    restored = back["state"][0]["exp_avg"]
    assert isinstance(restored, OptimState8bit) and restored.signed
    assert torch.equal(restored.codes, state8.codes) and torch.equal(restored.scale, state8.scale)
    assert torch.equal(restored.dequantize(), state8.dequantize())
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and list(back["state"]) == [0]
    assert isinstance(back["param_groups"][0]["lr"], torch.Tensor)
    with pytest.raises(TypeError, match="without pickle"):
        state_codec.encode({"f": lambda: 0}, "x")

    optimizer = make_optimizer(_Toy(), 1e-3, 0.1, (0.9, 0.999), 1e-8, kind="adamw8bit")
    scheduler = make_scheduler(optimizer, "cosine", 2, 10)
    skeleton, tensors = state_codec.encode(scheduler.state_dict(), "scheduler")
    assert state_codec.decode(skeleton, tensors)["base_lrs"][0].dtype == torch.float32



@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_adamw8bit_resumes_exactly(world, lora):
    """4 steps straight == 2 steps, a checkpoint, a new trainer that resumes, 2 more: same losses, same weights, and
    the checkpoint holds uint8 codes (no pickle). With LoRA adapters on the LM too (they are trained parameters)."""
    if lora:
        pytest.importorskip("peft")
    root, vision, lm, data = world
    tag = "-lora" if lora else ""

    def trainer(out: str) -> Trainer:
        path = train_config(root, vision, lm, data, steps=4, out=os.path.join(root, out + tag), interleaved=False,
                            save_every=100)
        extra = ["model.flamingo.lm_lora.r=8", "model.flamingo.lm_lora.alpha=16"] if lora else []
        return Trainer(load_config(path, ["optim.kind=adamw8bit", *extra]))

    straight = trainer("straight")
    losses = [float(straight.train_step()["loss"]) for _ in range(4)]
    assert any(type(straight.optimizer.state[p]["exp_avg"]).__name__ == "OptimState8bit" for p in straight.trained)

    first = trainer("resumed")
    resumed_losses = [float(first.train_step()["loss"]) for _ in range(2)]
    first.save()
    checkpoint = os.path.join(root, "resumed" + tag, "checkpoints", "step_00000002")
    assert not os.path.exists(os.path.join(checkpoint, "optimizer.pt"))
    with safe_open(os.path.join(checkpoint, "trained.safetensors"), "pt") as f:
        assert any(".lora_B." in k for k in f.keys()) == lora
    with safe_open(os.path.join(checkpoint, "optimizer.safetensors"), "pt") as f:
        assert any(k.endswith("/codes") and f.get_tensor(k).dtype == torch.uint8 for k in f.keys())
    second = trainer("resumed")
    assert second.step == 2
    resumed_losses += [float(second.train_step()["loss"]) for _ in range(2)]
    assert resumed_losses == losses
    a, b = dict(straight.model.named_parameters()), dict(second.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a), "weights differ after the resume"
    for p, q in zip(straight.trained, second.trained, strict=True):
        sa, sb = straight.optimizer.state[p]["exp_avg"], second.optimizer.state[q]["exp_avg"]
        assert type(sa) is type(sb) and torch.equal(sa.dequantize() if hasattr(sa, "codes") else sa,
                                                    sb.dequantize() if hasattr(sb, "codes") else sb)


@pytest.mark.slow
@pytest.mark.distributed
def test_adamw8bit_under_fsdp_resumes_exactly(world, tmp_path):
    """FSDP2 over two processes (shards of uneven sizes: each rank compiles its own update kernels) with 8-bit
    states: a run resumed from its step-2 checkpoint (states gathered, stored as codes, re-sharded) ends
    bit-identical to the straight run."""
    root, vision, lm, _ = world
    data = write_datasets(str(tmp_path / "same"), n_pairs=32, same_caption=True)
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    config = train_config(str(tmp_path), vision, lm, data, steps=4, out=str(tmp_path / "unused"), batch_size=2,
                          interleaved=False, save_every=2)

    def launch(out: str) -> dict[int, float]:
        result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29523",
                                 os.path.join(TESTS, "ddp_worker.py"), config, out, "train.distributed=fsdp",
                                 "optim.kind=adamw8bit"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return {m["step"]: m["loss"] for m in map(json.loads, f)}

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    losses = launch(straight)
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(os.path.join(straight, "checkpoints", "step_00000002"),
                    os.path.join(resumed, "checkpoints", "step_00000002"))
    again = launch(resumed)
    assert sorted(again) == [3, 4] and all(again[s] == losses[s] for s in again)
    a, b = (load_file(os.path.join(d, "final", "flamingo.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_from_before_optimizer_safetensors_still_resume(world):
    """An older checkpoint (optimizer.pt read with weights_only=True, the scheduler in state.json) loads the same
    optimizer and scheduler states as the safetensors one."""
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=4, out=os.path.join(root, "old"), interleaved=False,
                        save_every=100)
    trainer = Trainer(load_config(path))
    trainer.train_step()
    trainer.save()
    current = Trainer(load_config(path))
    checkpoint = os.path.join(root, "old", "checkpoints", "step_00000001")
    torch.save(current.optimizer.state_dict(), os.path.join(checkpoint, "optimizer.pt"))
    with open(os.path.join(checkpoint, "state.json")) as f:
        state = json.load(f)
    with open(os.path.join(checkpoint, "state.json"), "w") as f:
        json.dump({**state, "scheduler": current.scheduler.state_dict()}, f)
    os.remove(os.path.join(checkpoint, "optimizer.safetensors"))
    old = Trainer(load_config(path))
    assert old.step == 1 and old.scheduler.state_dict() == current.scheduler.state_dict()
    for p, q in zip(current.trained, old.trained, strict=True):
        a, b = current.optimizer.state[p], old.optimizer.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
