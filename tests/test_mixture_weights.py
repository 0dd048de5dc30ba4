"""The training mixture's weights and what it logs: a weight-0 dataset costs nothing (not read, not computed, not
logged) and resumes where it was; every logged loss is its mean over the steps since the previous logged step, with
the samples behind each dataset's, so a `sample`-mode dataset shows whether or not the logged step drew it."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from flamingo.config import FlamingoConfig
from flamingo.train.config import load_config
from flamingo.train.run_log import LossWindow, materialize
from flamingo.train.trainer import Trainer

from train_fixtures import train_config


def _records(output_dir: str) -> dict[int, dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_a_weight_0_dataset_is_not_read_or_computed_and_resumes_where_it_was(world):
    """`accumulate` mode read and ran a weight-0 dataset every step (its loss times 0: a forward and a backward for
    nothing, and its NaN would skip the step) and logged its loss. Now it is not read: its position stays, no
    `loss/<name>`, its samples/<name> is 0; a checkpoint keeps that position, and a resume with the weight raised
    reads it from there."""
    root, vision, lm, data = world
    out = os.path.join(root, "run-weight-0")
    path = train_config(root, vision, lm, data, steps=1, out=out)
    trainer = Trainer(load_config(path, ["data.1.loss_weight=0"]))
    unread = trainer.sources["interleaved"].state_dict()
    forwards = []
    real_forward = trainer.model.forward
    trainer.model.forward = lambda *a, **k: forwards.append(1) or real_forward(*a, **k)
    metrics = materialize(trainer.train_step())
    assert len(forwards) == 1 and metrics["samples"] == 4  # the pairs batch only
    assert "loss/interleaved" not in metrics and "samples/interleaved" not in metrics
    assert metrics["loss"] == metrics["loss/pairs"]
    assert trainer.sources["interleaved"].state_dict() == unread
    trainer.save()
    resumed = Trainer(load_config(path, ["data.1.loss_weight=0.5", "train.steps=2"]))
    assert resumed.step == 1 and resumed.sources["interleaved"].state_dict() == unread
    assert "loss/interleaved" in materialize(resumed.train_step())


def test_a_config_whose_every_weight_is_0_is_refused_before_the_model_loads(world, monkeypatch):
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "run-all-0"))
    monkeypatch.setattr("flamingo.train.trainer.build_model", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=r"every dataset in `data` has loss_weight 0.*'pairs': 0"):
        Trainer(load_config(path, ["data.0.loss_weight=0", "data.1.loss_weight=0"]))


def test_sample_mode_logs_each_datasets_mean_since_the_last_logged_step(world):
    """Draws pairs, pairs, interleaved, pairs (train.seed 0): with log_every 4 the record of step 4 held only the
    step's own dataset, so `interleaved`, drawn at step 3, never showed. Each loss is now its mean over the steps
    2-4 that computed it, with the samples behind it."""
    root, vision, lm, data = world
    out = os.path.join(root, "run-sample-window")
    trainer = Trainer(
        load_config(
            train_config(root, vision, lm, data, steps=4, out=out, mixture="sample", log_every=4, progress=False)
        )
    )
    steps = []
    real_step = trainer.train_step
    trainer.train_step = lambda: steps.append(real_step()) or steps[-1]
    trainer.run()
    steps = [materialize(m) for m in steps]
    drawn = [next(k[5:] for k in m if k.startswith("loss/")) for m in steps]
    assert drawn == ["pairs", "pairs", "interleaved", "pairs"]
    logged = _records(out)
    assert sorted(logged) == [1, 4]
    window = steps[1:]
    assert logged[4]["loss"] == pytest.approx(sum(m["loss"] for m in window) / 3, rel=1e-6)
    for name, rows in (("pairs", 4), ("interleaved", 2)):
        mine = [m[f"loss/{name}"] for m in window if f"loss/{name}" in m]
        assert logged[4][f"loss/{name}"] == pytest.approx(sum(mine) / len(mine), rel=1e-6), name
        assert logged[4][f"samples/{name}"] == rows * len(mine)
    assert logged[1]["samples/interleaved"] == 0 and "loss/interleaved" not in logged[1]
    assert logged[1]["loss/pairs"] == steps[0]["loss/pairs"]  # a window of one step: that step's loss


def test_a_loss_window_leaves_out_non_finite_steps_and_starts_again_after_each_log():
    window = LossWindow(["a", "b"])
    for a, b in ((1.0, None), (float("nan"), 4.0), (3.0, None)):
        step = {"loss": torch.tensor(a), "loss/a": torch.tensor(a), "samples/a": 2}
        if b is not None:
            step.update({"loss/b": torch.tensor(b), "samples/b": 5})
        window.add(step)
    logged = materialize(window.take())
    assert logged == {"loss": 2.0, "loss/a": 2.0, "loss/b": 4.0, "samples/a": 4, "samples/b": 5}
    window.add({"loss": torch.tensor(float("inf")), "loss/a": torch.tensor(float("inf")), "samples/a": 2})
    logged = materialize(window.take())
    assert math.isnan(logged["loss/a"]) and logged["samples/a"] == 0 and logged["samples/b"] == 0
    assert "loss/b" not in logged


def test_fsdp_sharding_of_quantized_weights_is_refused_before_the_model_loads(world, monkeypatch):
    """Under torchrun with FSDP, a config asking quantized frozen weights and fsdp_frozen: shard was refused only
    after every rank had loaded and quantized the backbones."""
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "run-fsdp-q"))
    monkeypatch.setattr("flamingo.train.trainer.dist_info", lambda: (1, 2, 1))
    monkeypatch.setattr("flamingo.train.trainer.build_model", lambda *a: pytest.fail("the model was built"))
    config = load_config(path, ["train.distributed=fsdp", "model.flamingo.quantize_frozen=int8"])
    with pytest.raises(ValueError, match="FSDP cannot shard quantized frozen weights"):
        Trainer(config)


def test_fsdp_sharding_of_an_init_from_models_saved_quantized_mode_is_refused_before_it_loads(world, tmp_path,
                                                                                               monkeypatch):
    """A model.init_from folder saved with quantize_frozen int8 trains quantized (its saved mode): under FSDP with
    fsdp_frozen: shard that was refused only after every rank had loaded it."""
    root, vision, lm, data = world
    saved = tmp_path / "saved"
    FlamingoConfig(vision_name_or_path=vision, lm_name_or_path=lm, quantize_frozen="int8",
                   media_token_id=5).save(str(saved))
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "run-fsdp-q-init"))
    monkeypatch.setattr("flamingo.train.trainer.dist_info", lambda: (1, 2, 1))
    monkeypatch.setattr("flamingo.train.trainer.build_model", lambda *a: pytest.fail("the model was built"))
    config = load_config(path, ["train.distributed=fsdp", f"model.init_from={saved}", "model.vision=null",
                                "model.lm=null", "model.tokenizer=null", "model.flamingo={}"])
    with pytest.raises(ValueError, match="FSDP cannot shard quantized frozen weights"):
        Trainer(config)
    # the config's own mode wins over the saved one
    config = load_config(path, ["train.distributed=fsdp", f"model.init_from={saved}", "model.vision=null",
                                        "model.lm=null", "model.tokenizer=null",
                                        "model.flamingo={quantize_frozen: none}"])
    with pytest.raises(pytest.fail.Exception, match="the model was built"):
        Trainer(config)
