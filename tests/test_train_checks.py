"""The trainer's checks around a run: passes without labelled tokens, what a resume must keep (`lm_lora`), modes
that cannot train (int4), what the run logs of its memory modes, and how its final model is saved when the
backbones' recorded paths are gone."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
import yaml

from flamingo import load_pretrained
from flamingo.build import from_backbones
from flamingo.config import FlamingoConfig
from flamingo.train.config import load_config
from flamingo.train.run_log import materialize
from flamingo.train.state import check_resumable
from flamingo.train.trainer import Trainer, build_model

from train_fixtures import train_config

SMALL = dict(xattn_heads=4, xattn_head_dim=8, resampler_heads=4, resampler_head_dim=8, num_latents=8,
             resampler_depth=2, max_frames=4)


def _unlabel_first_rows(trainer: Trainer, rows: int) -> None:
    """Every batch the trainer reads has its first `rows` rows without a labelled token."""
    read = trainer._next

    def next_batch(name: str) -> dict:
        batch = read(name)
        batch["labels"] = batch["labels"].clone()
        batch["labels"][:rows] = -100
        return batch

    trainer._next = next_batch  # type: ignore[method-assign]


@pytest.mark.parametrize("loss_chunks", [8, 0])
def test_a_micro_batch_without_labelled_tokens_trains_as_the_whole_batch(world, loss_chunks):
    """The first of 2 micro-batches has no labelled token: its mean was 0 / 0 = NaN, and NaN x its weight 0 made the
    step NaN and skipped. Now the step trains on the second micro-batch's tokens, as one undivided batch does."""
    root, vision, lm, data = world
    runs = {}
    for k in (1, 2):
        path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, f"empty-mb-{loss_chunks}-{k}"),
                            interleaved=False)
        trainer = Trainer(load_config(path, [f"train.micro_batches={k}", f"train.loss_chunks={loss_chunks}"]))
        _unlabel_first_rows(trainer, 2)  # batch_size 4: the whole first micro-batch of 2
        metrics = [materialize(trainer.train_step())]
        runs[k] = ([m["loss"] for m in metrics], {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                                                  if p.requires_grad})
        assert all(m["skipped_nonfinite"] == 0 for m in metrics), metrics
        assert all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in metrics), metrics
    assert runs[2][0] == pytest.approx(runs[1][0], rel=1e-6)
    for name, weight in runs[1][1].items():
        torch.testing.assert_close(runs[2][1][name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_loss_average_passes_leaves_a_pass_without_tokens_out(world):
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "empty-passes"), interleaved=False)
    trainer = Trainer(load_config(path, ["train.micro_batches=2", "train.loss_average=passes"]))
    probe = Trainer(load_config(path, ["train.micro_batches=2", f"train.output_dir={root}/empty-passes-probe"]))
    second = probe._micro_batches(probe._next("pairs"))[1]
    with torch.no_grad():
        mean = float(probe.model(**probe._to_device(second)).loss)  # the same initial weights
    _unlabel_first_rows(trainer, 2)
    metrics = materialize(trainer.train_step())
    assert metrics["skipped_nonfinite"] == 0 and metrics["loss/pairs"] == pytest.approx(mean, rel=1e-6)


def test_a_step_whose_dataset_has_no_labelled_token_is_still_skipped(world):
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "empty-step"), interleaved=False)
    trainer = Trainer(load_config(path, ["train.micro_batches=2"]))
    _unlabel_first_rows(trainer, 4)
    assert materialize(trainer.train_step())["skipped_nonfinite"] == 1


def test_a_checkpoint_of_another_lora_alpha_or_targets_is_refused_and_dropout_resumes(make_model):
    pytest.importorskip("peft")
    spec = {"r": 4, "alpha": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}
    model, _ = make_model(lm_lora=spec)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    check_resumable("ck", {"lm_lora": {**spec, "target_modules": ["v_proj", "q_proj"], "dropout": 0.5}}, model,
                    trained, "adamw")  # the targets' order and the dropout are no change of function
    for changed in ({"alpha": 64}, {"target_modules": ["q_proj"]}, {"r": 8}):
        with pytest.raises(ValueError, match=r"written with model.flamingo.lm_lora=.*the config says"):
            check_resumable("ck", {"lm_lora": {**spec, **changed}}, model, trained, "adamw")
    with pytest.raises(ValueError, match=r"lm_lora=None; the config says \{'r': 4"):
        check_resumable("ck", {"lm_lora": None}, model, trained, "adamw")


def test_resuming_with_another_lora_alpha_is_refused_and_a_new_dropout_is_logged(world, caplog):
    pytest.importorskip("peft")
    root, vision, lm, data = world
    out = os.path.join(root, "lora-resume")
    path = train_config(root, vision, lm, data, steps=2, out=out, interleaved=False)
    lora = "model.flamingo.lm_lora={r: 4, alpha: 4}"
    trainer = Trainer(load_config(path, [lora]))
    trainer.train_step()
    trainer.save()  # checkpoints/step_00000001, with its lm_lora in state.json
    with pytest.raises(ValueError, match=r"lm_lora=\{'r': 4, 'alpha': 4.*the config says \{'r': 4, 'alpha': 64"):
        Trainer(load_config(path, ["model.flamingo.lm_lora={r: 4, alpha: 64}"]))
    with caplog.at_level(logging.WARNING, logger="flamingo.train.trainer"):
        resumed = Trainer(load_config(path, ["model.flamingo.lm_lora={r: 4, alpha: 4, dropout: 0.5}"]))
    assert resumed.step == 1
    assert "model.flamingo.lm_lora.dropout 0.0 -> 0.5: the config's applies from step 2 on" in caplog.text


def test_resuming_with_other_frozen_storage_is_logged_as_not_exact(world, caplog):
    pytest.importorskip("torchao")
    root, vision, lm, data = world
    out = os.path.join(root, "frozen-resume")
    path = train_config(root, vision, lm, data, steps=2, out=out, interleaved=False)
    trainer = Trainer(load_config(path))
    trainer.train_step()
    trainer.save()  # state.json records quantize_frozen none, frozen_dtype null, precision fp32
    with caplog.at_level(logging.WARNING, logger="flamingo.train.trainer"):
        same = Trainer(load_config(path))
    assert same.step == 1 and "frozen-backbone settings" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="flamingo.train.trainer"):
        resumed = Trainer(load_config(path, ["model.flamingo.quantize_frozen=int8"]))
    assert resumed.step == 1
    assert ("frozen-backbone settings than it was saved with (model.flamingo.quantize_frozen none -> int8): not an "
            "exact resume, the frozen weights compute differently from step 2 on") in caplog.text


def test_int4_is_refused_for_training_when_the_config_is_read_or_the_model_carries_it(world, make_model):
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "int4"), interleaved=False)
    with pytest.raises(ValueError, match="quantize_frozen is int4, which runs forward only.*nf4"):
        load_config(path, ["model.flamingo.quantize_frozen=int4"])
    model, processor = make_model()  # a model from init_from keeps its saved mode: int4 here
    model.config.quantize_frozen = "int4"
    with pytest.raises(ValueError, match=r"quantize_frozen \(or the saved mode of model.init_from.*is int4, which "
                                         "runs forward only"):
        Trainer(load_config(path), model=model, processor=processor)
    with pytest.raises(ValueError, match="needs processor="):  # (was an assert: gone under `python -O`)
        Trainer(load_config(path), model=model)


def test_the_run_logs_what_it_quantized_and_a_loss_without_chunks(world, make_model, caplog):
    pytest.importorskip("torchao")
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "logged"), interleaved=False)
    with caplog.at_level(logging.INFO, logger="flamingo.train.trainer"):
        Trainer(load_config(path, ["model.flamingo.quantize_frozen=int8"]))
    assert "quantize_frozen=int8: " in caplog.text and " linear layers quantized, 0 kept in float " in caplog.text
    caplog.clear()
    config = load_config(path, [f"train.output_dir={root}/logged-chunks"])
    torch.manual_seed(0)
    model, processor = build_model(config)
    model.head_is_last_op = lambda: False  # type: ignore[method-assign]  # as Gemma 2's soft-capped head
    with caplog.at_level(logging.INFO, logger="flamingo.train.trainer"):
        Trainer(config, model=model, processor=processor)
    assert "train.loss_chunks=8: LlamaForCausalLM changes its head's output" in caplog.text


@pytest.fixture(scope="module")
def moved_full_checkpoint(world, tmp_path_factory) -> str:
    """A full checkpoint whose config names backbone paths that no longer exist (built from a copy, then deleted):
    what a downloaded or copied full checkpoint looks like on another machine."""
    root, vision, lm, _ = world
    base = tmp_path_factory.mktemp("moved")
    copies = {part: shutil.copytree(src, base / "alice" / part) for part, src in (("vision", vision), ("lm", lm))}
    model, processor = from_backbones(str(copies["vision"]), str(copies["lm"]), config=FlamingoConfig(**SMALL))
    full = str(base / "bob_download")
    model.save_pretrained(full, processor=processor)
    shutil.rmtree(base / "alice")
    return full


def _init_from_config(world, full: str, out: str) -> str:
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=out, interleaved=False)
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["model"] = {"init_from": full}
    raw["train"]["save_every"] = 0
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def test_a_run_from_a_moved_full_checkpoint_saves_its_final_model_full(world, moved_full_checkpoint, caplog):
    root = world[0]
    out = os.path.join(root, "from-moved")
    path = _init_from_config(world, moved_full_checkpoint, out)
    with caplog.at_level(logging.INFO, logger="flamingo.train.trainer"):
        trainer = Trainer(load_config(path))
    assert "the final model will be saved full: the backbone(s) vision_name_or_path" in caplog.text
    assert trainer.model.name_or_path is None  # trained from here: no longer the model in init_from (eval's label)
    final = trainer.run()
    assert os.path.isdir(os.path.join(final, "vision")) and os.path.isdir(os.path.join(final, "lm"))
    assert trainer.model.name_or_path == final
    model, _ = load_pretrained(final)
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if name in trained:
            assert torch.equal(p, trained[name].detach()), name


def test_a_trained_only_final_save_of_unresolved_backbones_is_refused_before_step_1(world, moved_full_checkpoint):
    root = world[0]
    path = _init_from_config(world, moved_full_checkpoint, os.path.join(root, "from-moved-refused"))
    with pytest.raises(ValueError, match=r"save_trained_only: true, but the model's backbone\(s\) vision_name_or_path"):
        Trainer(load_config(path, ["train.save_trained_only=true"]))
    pytest.importorskip("torchao")  # quantized, its final save is whole with the float backbones of vision/, lm/
    trainer = Trainer(load_config(path, ["model.flamingo.quantize_frozen=int8"]))
    assert trainer.backbones_from is not None and trainer.backbones_from[0] == os.path.abspath(moved_full_checkpoint)


def test_a_max_tokens_past_the_lms_positions_is_refused_or_a_default_lowered_before_step_1(world, make_model,
                                                                                            caplog):
    """The forward refuses a sample longer than the LM's positions: a max_tokens the config sets above them is refused
    at start, not when the first long sample is drawn (hours in, and again on resume); a kind's default above them is
    lowered to them, with a warning. Packed rows may be wider (positions restart at each sample)."""
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "positions"))
    model, processor = make_model("gpt2", lm_overrides={"n_positions": 48})
    config = load_config(path)  # pairs: max_tokens 32; interleaved: 64
    with pytest.raises(ValueError, match=r"dataset 'interleaved': max_tokens 64 is more than the LM's 48 positions"):
        Trainer(config, model=model, processor=processor)
    del config.data[1].options["max_tokens"]  # the interleaved default, 256
    config.data[1].options["pack_tokens"] = 96
    with caplog.at_level(logging.WARNING, logger="flamingo"):
        trainer = Trainer(config, model=model, processor=processor)
    assert trainer.sources["interleaved"].spec.options["max_tokens"] == 48
    assert trainer.sources["pairs"].spec.options["max_tokens"] == 32
    assert "the interleaved default max_tokens 256 is more than the LM's 48 positions" in caplog.text
    assert "max_tokens" not in config.data[1].options  # the config (saved with the run) keeps what the user wrote
