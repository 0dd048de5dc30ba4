"""Validation loss during training (`validation:` datasets, `train.eval_every`, `train.eval_batches`): the token mean
over the held-out set, the same batches at every evaluation, logged at the chosen steps and at the end, and a run that
trains exactly as it does without it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from flamingo.data.build import build_source
from flamingo.train.config import load_config
from flamingo.train.run_log import materialize
from flamingo.train.trainer import Trainer

from train_fixtures import train_config, write_datasets

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")


def _config(world, name: str, steps: int = 4, validation: bool = True, **train):
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=steps, out=os.path.join(root, name), **train)
    raw = yaml.safe_load(open(path))
    if validation:
        raw["validation"] = [{"name": "held_out", "kind": "pairs", "path": data["pairs"], "batch_size": 5,
                              "options": {"max_tokens": 32}}]
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return load_config(path)


def _manual_loss(trainer: Trainer, batches: int = 0) -> tuple[float, float, int]:
    """The held-out set's token-mean loss, batch by batch through the model in eval mode (no Trainer code)."""
    source = build_source(trainer.config.validation[0], trainer.processor, seed=trainer.config.train.seed + 10**6)
    model = trainer.model.eval()
    total, tokens, read = 0.0, 0, 0
    with torch.no_grad():
        for i, batch in enumerate(source):
            if batches and i >= batches:
                break
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "images", "num_media")
                      if k in batch}
            out = model(**inputs)
            n = int((model.loss_targets(batch["labels"], batch["input_ids"], batch["attention_mask"]) != -100).sum())
            assert int(out.loss_tokens) == n
            total, tokens, read = total + float(out.loss) * n, tokens + n, read + 1
    model.train()
    return total / tokens, tokens, read


def test_validation_loss_is_the_token_mean_over_the_held_out_set(world):
    trainer = Trainer(_config(world, "val-mean"))
    for _ in range(2):
        trainer.train_step()
    values = trainer.validate()
    loss, tokens, read = _manual_loss(trainer)
    assert values["val_loss/held_out"] == pytest.approx(loss, rel=1e-6)
    assert values["val_tokens/held_out"] == tokens and values["val_batches/held_out"] == read == 10  # 48 = 9x5 + 3
    assert trainer.validate() == values  # the same batches from the same start, every time
    assert trainer.model.training and trainer.model.lm.training is False  # back in training mode (LM frozen)


def test_eval_batches_reads_the_same_first_batches(world):
    trainer = Trainer(_config(world, "val-first", eval_batches=3))
    values = trainer.validate()
    loss, tokens, read = _manual_loss(trainer, batches=3)
    assert values["val_batches/held_out"] == read == 3
    assert values["val_loss/held_out"] == pytest.approx(loss, rel=1e-6)
    assert trainer.validate() == values


def test_validation_leaves_the_training_run_unchanged_and_is_logged(world):
    root = world[0]
    plain = Trainer(_config(world, "val-off", steps=4, validation=False))
    plain.run()
    with_val = Trainer(_config(world, "val-on", steps=4, eval_every=3))
    with_val.run()
    lines = [json.loads(line) for line in open(os.path.join(root, "val-on", "metrics.jsonl"))]
    val = [line for line in lines if "val_loss/held_out" in line]
    assert [line["step"] for line in val] == [3, 4]  # every 3 steps, and at the end
    train_on = [line["loss"] for line in lines if "loss" in line]
    train_off = [json.loads(line)["loss"] for line in open(os.path.join(root, "val-off", "metrics.jsonl"))]
    assert train_on == train_off
    for picture in ("loss.png", "gates.png"):  # drawn at each checkpoint and at the end (train/plots.py)
        assert os.path.getsize(os.path.join(root, "val-on", picture)) > 0
    for (name, a), b in zip(plain.model.named_parameters(), with_val.model.parameters()):
        assert torch.equal(a, b), name


def test_validation_settings_are_checked(world):
    with pytest.raises(ValueError, match="eval_every"):
        _config(world, "val-bad", eval_every=-1)
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "val-dup"))
    raw = yaml.safe_load(open(path))
    raw["validation"] = [{"name": "a", "kind": "pairs", "path": data["pairs"]}] * 2
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    with pytest.raises(ValueError, match="unique"):
        load_config(path)
    raw["validation"] = [{"name": "tiny", "kind": "pairs", "path": data["pairs"], "batch_size": 64,
                          "options": {"drop_last": True}}]  # 48 pairs: no batch of 64
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    with pytest.raises(ValueError, match="gave no batch of 64"):
        Trainer(load_config(path))  # when the trainer starts, not at the first evaluation
    trainer = Trainer(_config(world, "val-none", validation=False))
    with pytest.raises(ValueError, match="no `validation` datasets"):
        trainer.validate()
    assert materialize(trainer.train_step())["loss"] > 0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("distributed, port", [("ddp", "29527"), ("fsdp", "29529")])
def test_two_processes_validate_as_one_process(world, tmp_path, distributed, port):
    """Each rank reads its half of the held-out set (24 pairs, 6 batches of 4); the ranks' sums make the one
    process's token mean over all 48 (its 12 batches of 4), after the same 3 training steps."""
    root, vision, lm, _ = world
    data = write_datasets(str(tmp_path / "same"), n_pairs=48, same_caption=True)  # equal shapes across ranks
    config = train_config(str(tmp_path), vision, lm, data, steps=3, out=str(tmp_path / "two"), batch_size=2,
                          interleaved=False)
    raw = yaml.safe_load(open(config))
    raw["validation"] = [{"name": "held_out", "kind": "pairs", "path": data["pairs"], "batch_size": 4,
                          "options": {"max_tokens": 32}}]
    with open(config, "w") as f:
        yaml.safe_dump(raw, f)
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", port, WORKER, config,
                          str(tmp_path / "two"), f"train.distributed={distributed}"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, WORKER, config, str(tmp_path / "one"), "--single"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    def validation(out: str) -> dict:
        lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        return next(line for line in lines if "val_loss/held_out" in line)

    a, b = validation(str(tmp_path / "two")), validation(str(tmp_path / "one"))
    assert a["step"] == b["step"] == 3
    assert a["val_tokens/held_out"] == b["val_tokens/held_out"] and a["val_batches/held_out"] == 12
    assert b["val_batches/held_out"] == 12
    assert a["val_loss/held_out"] == pytest.approx(b["val_loss/held_out"], rel=1e-5)
