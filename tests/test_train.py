"""Training: a tiny run learns and writes a loadable model, frozen weights stay bit-identical, exact resume after
SIGKILL, DDP over two processes equals one process with the doubled batch (also with quantized frozen backbones and
LoRA), non-finite losses are skipped, the `sample` mixture draws its datasets from one seeded sampler."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flamingo import load_pretrained
from flamingo.train.config import load_config, parse_config
from flamingo.train.run_log import materialize
from flamingo.train.trainer import NonFiniteLossError, Trainer, build_model

from train_fixtures import nan_losses_after_the_first_step, train_config, write_datasets

TESTS = os.path.dirname(os.path.abspath(__file__))



def _losses(output_dir: str) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run re-logs steps after its checkpoint: the last entry wins)."""
    losses = {}
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "loss" in m:  # (validation entries hold val_loss/* only)
                losses[m["step"]] = m["loss"]
    return losses


def _trained(output_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(output_dir, "final", "flamingo.safetensors"))


@pytest.mark.slow
def test_tiny_run_learns_writes_loadable_model_and_keeps_frozen_weights(world):
    root, vision, lm, data = world
    config = load_config(train_config(root, vision, lm, data, steps=30, out=os.path.join(root, "run-learn"), lr=1e-2))
    torch.manual_seed(config.train.seed)  # the same initial weights as the trainer's (it seeds, then builds)
    reference, _ = build_model(config)
    trainer = Trainer(config)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    out = trainer.run()

    losses = _losses(config.train.output_dir)
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(26, 31)) / 5
    assert last < first - 0.5, (first, last)

    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), initial[name]), f"trained parameter {name} did not change"
        else:
            assert torch.equal(p.detach(), initial[name]), f"frozen parameter {name} changed"
    # the frozen backbones are exactly the saved ones (nothing trained them, nothing re-initialised them)
    ref = dict(reference.named_parameters())
    for name, p in trainer.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), ref[name].detach()), name
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == \
        set(trainer.model.trainable_parameters())

    model, processor = load_pretrained(out)  # a trained-only directory referring to the backbones by path
    model.eval()
    batch = processor("<image>a", images=[os.path.join(os.path.dirname(data["pairs"]), "images", "p0.png")])
    with torch.no_grad():
        loaded = model(**batch).logits
        trainer.model.eval()
        trained = trainer.model(**batch).logits
    assert torch.equal(loaded, trained)
    gates = json.loads(open(os.path.join(config.train.output_dir, "metrics.jsonl")).readline())["gates"]
    assert set(gates) == {str(i) for i in model.xattn_layer_indices}


def test_metrics_logged_every_log_every_steps(world):
    """Metrics are read from the device once per `log_every` window: lines for steps 1, 3 and the last (4), each with
    finite numbers (not tensors) and the window's samples/s."""
    root, vision, lm, data = world
    config = load_config(train_config(root, vision, lm, data, steps=4, out=os.path.join(root, "run-log"),
                                      interleaved=False, log_every=3, save_every=10))
    Trainer(config).run()
    with open(os.path.join(config.train.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 3, 4]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "samples_per_s", "loss/pairs"))
        assert r["skipped_nonfinite"] == 0 and set(r["gates"])
        assert 0 < r["max_rss_gib"] < 64  # the process's resident high-water (peak_memory_gib on CUDA)


def test_batches_are_checked_on_the_cpu_and_media_counts_stay_there(world):
    """The trainer checks `<image>` counts on the CPU batch (a clear error, before anything reaches the device) and
    leaves `num_media` / `num_frames` on the CPU, where they select the real media without a host sync."""
    root, vision, lm, data = world
    trainer = Trainer(load_config(train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "run-check"),
                                               interleaved=False)))
    batch = trainer._next("pairs")
    moved = trainer._to_device(batch)
    assert moved["check_media"] is False and moved["num_media"].device.type == "cpu"
    assert torch.isfinite(trainer.wrapped(**moved).loss)
    bad = {**batch, "num_media": batch["num_media"] + 1}
    with pytest.raises(ValueError, match=r"<image> token\(s\) but"):
        trainer._to_device(bad)


def test_micro_batches_train_as_the_whole_batch(world):
    """Gradient accumulation weighs each micro-batch by its labelled tokens: 2 micro-batches of unequal token
    counts train as the one batch (a mean of the micro-batches' means would not: 1e-3 apart in the weights here)."""
    root, vision, lm, data = world
    runs = {}
    for k in (1, 2):
        path = train_config(root, vision, lm, data, steps=3, out=os.path.join(root, f"micro-{k}"))
        trainer = Trainer(load_config(path, [f"train.micro_batches={k}"]))
        if k == 2:  # the first step's micro-batches, read by a second trainer on the same data
            probe = Trainer(load_config(path, ["train.micro_batches=2", f"train.output_dir={root}/micro-probe"]))
            halves = probe._micro_batches(probe._next("interleaved"))
            counts = [int((probe.model.loss_targets(h["labels"], h["input_ids"], h["attention_mask"]) != -100).sum())
                      for h in halves]
            assert counts[0] != counts[1]  # the weighting matters in this step
        losses = [materialize(trainer.train_step()) for _ in range(3)]
        runs[k] = ([m["loss"] for m in losses], [m["loss/interleaved"] for m in losses],
                   {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert runs[2][0] == pytest.approx(runs[1][0], rel=1e-6) and runs[2][1] == pytest.approx(runs[1][1], rel=1e-6)
    for name, weight in runs[1][2].items():
        torch.testing.assert_close(runs[2][2][name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_loss_average_passes_is_the_mean_of_the_micro_batches_means(world):
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "passes"), interleaved=False)
    trainer = Trainer(load_config(path, ["train.micro_batches=2", "train.loss_average=passes"]))
    probe = Trainer(load_config(path, ["train.micro_batches=2", f"train.output_dir={root}/passes-probe"]))
    halves = probe._micro_batches(probe._next("pairs"))
    with torch.no_grad():
        means = [float(probe.model(**probe._to_device(h)).loss) for h in halves]  # the same initial weights
    assert means[0] != pytest.approx(means[1])
    assert materialize(trainer.train_step())["loss/pairs"] == pytest.approx(sum(means) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="loss_average must be tokens or passes"):
        load_config(path, ["train.loss_average=samples"])


def test_sample_mixture_draws_by_loss_weight_and_resumes_from_either_state_key(world):
    """`mixture: sample` draws each step's dataset as `torch.multinomial(loss weights, 1)` with a generator seeded
    train.seed + 1 (this pins a run's sequence of datasets); a checkpoint resumes the draws, whether it holds the
    generator's state under "mixture" or as "sample_generator"."""
    root, vision, lm, data = world
    out = os.path.join(root, "run-sample")
    config = load_config(train_config(root, vision, lm, data, steps=1, out=out, mixture="sample"))
    generator = torch.Generator().manual_seed(config.train.seed + 1)
    weights = torch.tensor([1.0, 0.5])  # pairs, interleaved
    expected = [["pairs", "interleaved"][int(torch.multinomial(weights, 1, generator=generator))] for _ in range(60)]
    trainer = Trainer(config)
    assert [trainer._step_datasets() for _ in range(20)] == [[name] for name in expected[:20]]
    trainer.save()
    state_path = os.path.join(out, "checkpoints", "step_00000000", "state.json")
    with open(state_path) as f:
        state = json.load(f)
    resumed = Trainer(config)
    assert [resumed._step_datasets()[0] for _ in range(40)] == expected[20:60]
    state["sample_generator"] = state.pop("mixture")["generator"]
    with open(state_path, "w") as f:
        json.dump(state, f)
    resumed = Trainer(config)
    assert [resumed._step_datasets()[0] for _ in range(40)] == expected[20:60]


def test_resuming_with_a_renamed_dataset_warns_and_starts_it_fresh(world):
    """A checkpoint saved with other datasets than the config names: the new one reads from its beginning, the
    gone one is no longer read, each said in a warning (not a bare KeyError); the datasets it shares resume."""
    root, vision, lm, data = world
    out = os.path.join(root, "run-renamed")
    config = load_config(train_config(root, vision, lm, data, steps=1, out=out))
    trainer = Trainer(config)
    unread = trainer.sources["interleaved"].state_dict()
    trainer.train_step()
    trainer.save()
    saved = trainer.sources["pairs"].state_dict()
    assert trainer.sources["interleaved"].state_dict() != unread
    renamed = load_config(train_config(root, vision, lm, data, steps=2, out=out), ["data.1.name=pages"])
    with pytest.warns(UserWarning, match=r"\['pages'\] start from their beginning, \['interleaved'\] are no longer"):
        resumed = Trainer(renamed)
    assert resumed.step == 1 and resumed.sources["pairs"].state_dict() == saved
    assert resumed.sources["pages"].state_dict() == unread  # (the same file, options and seed, as yet unread)
    assert resumed.train_step()["step"] == 2


def test_resuming_with_datasets_removed_added_or_moved_keeps_the_others_positions(world, recwarn):
    """Datasets are seeded by their index in `data`: removing one, or adding or moving one before others, on resume
    gives the others other seeds. Their saved positions go on under the seeds they were made with, so each reads the
    batches it would have read next (no epoch restarts); an unchanged list resumes as it always did."""
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "run-moved"))
    trainer = Trainer(load_config(path))
    trainer.train_step()
    trainer.save()
    saved = {name: source.state_dict() for name, source in trainer.sources.items()}
    following = {name: trainer._next(name)["keys"] for name in saved}  # what the run reads next
    with open(path) as f:
        raw = yaml.safe_load(f)
    pairs, docs = raw["data"]
    raw["train"]["steps"] = 2
    for datasets in ([pairs, docs], [docs], [{**pairs, "name": "extra"}, pairs, docs], [docs, pairs]):
        resumed = Trainer(parse_config({**raw, "data": datasets}))
        assert resumed.step == 1
        for name in set(saved) & set(resumed.sources):
            assert resumed.sources[name].state_dict() == saved[name], ([d["name"] for d in datasets], name)
            assert resumed._next(name)["keys"] == following[name], ([d["name"] for d in datasets], name)
        if len(datasets) == 1:
            removed = resumed
    messages = [str(w.message) for w in recwarn]
    assert any("['extra'] start from their beginning" in m for m in messages)
    assert not [m for m in messages if "saved data position" in m]
    recwarn.clear()
    removed.rank = 1  # the same resume on another torchrun rank: the run-wide warning is rank 0's
    removed._resume()
    assert not [w for w in recwarn if "other datasets" in str(w.message)]


def test_run_wide_log_lines_of_the_model_setup_come_from_rank_0(caplog, monkeypatch):
    """The final save's kind and the quantization counts are said once per run, by rank 0 (every torchrun rank
    builds the model)."""
    from flamingo.tiny import tiny_flamingo
    from flamingo.train.trainer import _quantize, check_final_save

    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        model, _ = tiny_flamingo("llama")
        model.config.vision_name_or_path, model.config.lm_name_or_path = "/nowhere/vision", "/nowhere/lm"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flamingo.train.trainer"):
            check_final_save(model, None)
            model.config.quantize_frozen = "int8"
            _quantize(model)
        said = caplog.text
        assert ("will be saved full" in said and "int8" in said) if rank == "0" else said == "", (rank, said)


def _train_command(config: str) -> list[str]:
    return [sys.executable, "-m", "flamingo.cli", "train", config]


@pytest.mark.slow
def test_exact_resume_after_sigkill(world):
    root, vision, lm, data = world
    straight = os.path.join(root, "run-straight")
    resumed = os.path.join(root, "run-resumed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_command(train_config(root, vision, lm, data, steps=20, out=straight)), check=True,
                   env=env, capture_output=True)
    config = train_config(root, vision, lm, data, steps=20, out=resumed, save_every=1)
    proc = subprocess.Popen(_train_command(config), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = os.path.join(resumed, "checkpoints", "step_00000010", "state.json")
    deadline = time.time() + 120
    while not os.path.exists(checkpoint) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not os.path.exists(os.path.join(resumed, "final"))
    killed_at = max(_losses(resumed))
    assert 10 <= killed_at < 20
    subprocess.run(_train_command(config), check=True, env=env, capture_output=True)  # auto-resume

    a, b = _losses(straight), _losses(resumed)
    assert list(a) == list(range(1, 21)) and sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]  # bit-identical per-step losses
    ta, tb = _trained(straight), _trained(resumed)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("same_caption", [True, False])
def test_ddp_two_processes_equal_one_process_with_double_batch(world, tmp_path, same_caption):
    """With captions of different lengths the ranks' token counts differ: the step's loss is still the mean over
    all their tokens (`Trainer._token_shares`), the one process's over the same samples."""
    root, vision, lm, _ = world
    data = write_datasets(str(tmp_path / "same"), n_pairs=32, same_caption=same_caption)
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = str(tmp_path / "ddp")
    config = train_config(str(tmp_path), vision, lm, data, steps=4, out=out, batch_size=2, interleaved=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517" if same_caption else "29531",
                             os.path.join(TESTS, "ddp_worker.py"), config, out], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(os.path.join(out, f"params_rank{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # identical parameters on both ranks

    # one process, batch 4 = rank 0's 2 samples + rank 1's 2 samples of every step
    single = subprocess.run([sys.executable, os.path.join(TESTS, "ddp_worker.py"), config, str(tmp_path / "one"),
                             "--single"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_losses, one_losses = _losses(out), _losses(str(tmp_path / "one"))
    assert len(ddp_losses) == len(one_losses) == 4
    for step in ddp_losses:
        assert abs(ddp_losses[step] - one_losses[step]) < 1e-5, (step, ddp_losses, one_losses)
    one = load_file(os.path.join(str(tmp_path / "one"), "params_rank0.safetensors"))
    assert all(torch.allclose(one[k], ranks[0][k], atol=1e-5) for k in one)


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_losses_skip_steps_then_abort(world, monkeypatch, fused):
    """Non-finite steps leave every parameter (and the optimizer's state) untouched and are counted; a streak of
    `max_nonfinite` aborts. The fused optimizer skips on the device (no host sync in the step): its streak is read
    at logged steps, so the abort comes from `check_nonfinite`."""
    root, vision, lm, data = world
    config = load_config(train_config(root, vision, lm, data, steps=10, out=os.path.join(root, f"run-nan-{fused}"),
                                      interleaved=False, max_nonfinite=3))
    config.optim.fused = fused
    trainer = Trainer(config)
    assert trainer.skip_on_device == fused
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    nan_losses_after_the_first_step(trainer, monkeypatch)  # step 1 is fine, then every loss is NaN
    trainer.train_step()
    after_good = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    moments = {k: v.clone() for k, v in trainer.optimizer.state[trainer.trained[0]].items()}
    assert any(not torch.equal(before[n], after_good[n]) for n in before)
    for _ in range(2):
        metrics = materialize(trainer.train_step())  # skipped: parameters and optimizer state untouched, counted
        assert all(torch.equal(p.detach(), after_good[n]) for n, p in trainer.model.named_parameters()
                   if p.requires_grad)
        state = trainer.optimizer.state[trainer.trained[0]]
        assert all(torch.equal(state[k], v) for k, v in moments.items())
    assert metrics["skipped_nonfinite"] == 2 and math.isnan(metrics["loss"])
    # named by the step that made the streak; a ValueError, which `flamingo train` prints as a message
    with pytest.raises(ValueError, match="3 non-finite losses in a row at step 4") as raised:
        trainer.train_step()
        trainer.check_nonfinite()
    assert isinstance(raised.value, NonFiniteLossError)


@pytest.mark.parametrize("fused,clip", [(False, 0.0), (False, 1.0), (True, 0.0)])
def test_a_gradient_that_overflows_skips_the_step_as_a_non_finite_loss_does(world, fused, clip):
    """A finite loss whose gradient overflowed (inf in one tensor) was stepped: with no clip the norm's inf / inf
    scaled every gradient to NaN, with a clip the overflowing one became 0 * inf = NaN, and the run went on to a NaN
    final model. The step is skipped and counted, every parameter and moment untouched."""
    root, vision, lm, data = world
    out = os.path.join(root, f"run-inf-{fused}-{clip}")
    config = load_config(train_config(root, vision, lm, data, steps=4, out=out, interleaved=False, grad_clip=clip))
    config.optim.fused = fused
    trainer = Trainer(config)
    trainer.train_step()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    moments = {k: v.clone() for k, v in trainer.optimizer.state[trainer.trained[0]].items()}
    gate = trainer.model.xattn[0].ffw_gate
    handle = gate.register_hook(lambda g: torch.full_like(g, float("inf")))
    metrics = materialize(trainer.train_step())
    handle.remove()
    assert math.isfinite(metrics["loss"]) and metrics["skipped_nonfinite"] == 1
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), before[n]), n
    assert all(torch.equal(trainer.optimizer.state[trainer.trained[0]][k], v) for k, v in moments.items())
    metrics = materialize(trainer.train_step())  # the next step trains again
    assert metrics["skipped_nonfinite"] == 1 and math.isfinite(metrics["grad_norm"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_run_whose_every_step_was_skipped_is_not_called_trained(world, monkeypatch):
    """Fewer non-finite steps than `max_nonfinite` never abort a run, but one that skipped all of them (a NaN
    loss_weight did) ends with an error and no final/. Its metrics.jsonl holds `null` for the NaN loss (strict JSON),
    read back as NaN."""
    from flamingo.train.plots import read_metrics

    root, vision, lm, data = world
    out = os.path.join(root, "run-all-nan")
    trainer = Trainer(load_config(train_config(root, vision, lm, data, steps=2, out=out, interleaved=False)))
    nan_losses_after_the_first_step(trainer, monkeypatch, from_forward=1)
    with pytest.raises(NonFiniteLossError, match="every one of the run's 2 steps had a non-finite loss"):
        trainer.run()
    assert not os.path.exists(os.path.join(out, "final"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        text = f.read()
    assert '"loss": null' in text and "NaN" not in text
    assert all(math.isnan(r["loss"]) for r in read_metrics(os.path.join(out, "metrics.jsonl"))[0])


def test_the_logged_lr_is_the_one_the_step_used(world):
    """Linear warmup over 2 steps, then linear decay to 0 at step 4: the steps use 0.5, 1, 1, 0.5 x lr (the
    scheduler steps after the optimizer), and each logs its own, not the next step's."""
    root, vision, lm, data = world
    config = load_config(train_config(root, vision, lm, data, steps=4, out=os.path.join(root, "run-lr"),
                                      interleaved=False), ["schedule.kind=linear"])
    trainer = Trainer(config)
    used = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    logged = [trainer.train_step()["lr"] for _ in range(4)]
    assert used == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4]) and logged == used


def test_a_bare_cuda_device_is_this_ranks_gpu(monkeypatch):
    """`train.device: cuda` needs an index for `torch.cuda.set_device` (and each rank its own GPU)."""
    from flamingo.runtime.distributed import default_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device("cuda") == torch.device("cuda", 1)
    assert default_device("cuda:0") == torch.device("cuda", 0) and default_device("cpu") == torch.device("cpu")


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_processes_equal_one_process_and_resume(world, tmp_path):
    """FSDP2 (frozen backbones sharded too): the same losses as one process with the doubled batch; a run resumed
    from its step-2 checkpoint (sharded optimizer state gathered and re-sharded) ends bit-identical."""
    root, vision, lm, _ = world
    data = write_datasets(str(tmp_path / "same"), n_pairs=32, same_caption=True)
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    config = train_config(str(tmp_path), vision, lm, data, steps=4, out=str(tmp_path / "unused"), batch_size=2,
                          interleaved=False, save_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out: str, *extra: str) -> None:
        result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29519",
                                 os.path.join(TESTS, "ddp_worker.py"), config, out, "train.distributed=fsdp", *extra],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    straight, resumed = str(tmp_path / "fsdp"), str(tmp_path / "fsdp-resumed")
    launch(straight)
    single = subprocess.run([sys.executable, os.path.join(TESTS, "ddp_worker.py"), config, str(tmp_path / "one"),
                             "--single"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    fsdp_losses, one_losses = _losses(straight), _losses(str(tmp_path / "one"))
    assert sorted(fsdp_losses) == [1, 2, 3, 4]
    for step in fsdp_losses:
        assert abs(fsdp_losses[step] - one_losses[step]) < 1e-5, (step, fsdp_losses, one_losses)
    ranks = [load_file(os.path.join(straight, f"params_rank{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])

    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(os.path.join(straight, "checkpoints", "step_00000002"),
                    os.path.join(resumed, "checkpoints", "step_00000002"))
    launch(resumed)
    b = _losses(resumed)
    assert sorted(b) == [3, 4] and all(b[s] == fsdp_losses[s] for s in b)
    ta, tb = _trained(straight), _trained(resumed)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("fsdp_frozen,cache_mb", [("shard", 0), ("replicate", 1)])
def test_fsdp_ranks_with_only_text_only_rows_train_as_one_process(world, tmp_path, fsdp_frozen, cache_mb):
    """Chat data with `text_only`: under FSDP a rank whose batch holds no image still runs the sharded tower and
    resampler (on a blank frame no token sees), so the ranks stay in step; losses, validation losses and trained
    weights equal one process's on both ranks' rows. With the tower replicated, its features may be cached (a rank
    that skips the tower then joins no collective of it)."""
    import yaml

    root, vision, lm, _ = world
    (tmp_path / "img").mkdir()
    from flamingo.tiny import random_image

    random_image(0).save(tmp_path / "img" / "0.png")
    text = {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]}
    image = {"image": "img/0.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                     {"from": "gpt", "value": "A red square."}]}
    path = tmp_path / "chat.jsonl"  # record i goes to rank i % 2: rank 0 reads only text, rank 1 only images
    path.write_text("".join(json.dumps(r) + "\n" for r in [text, image] * 8))
    chat = {"name": "chat", "kind": "chat", "path": str(path), "batch_size": 2,
            "options": {"shuffle": False, "text_only": True}}
    config = {"model": {"vision": vision, "lm": lm, "flamingo": dict(
                  xattn_heads=4, xattn_head_dim=8, resampler_heads=4, resampler_head_dim=8, num_latents=8,
                  resampler_depth=2)},
              "data": [chat], "validation": [{**chat, "name": "held"}], "optim": {"lr": 1e-2},
              "train": {"steps": 3, "seed": 0, "save_every": 0, "log_every": 1, "eval_every": 3,
                        "distributed": "fsdp", "fsdp_frozen": fsdp_frozen, "cache_vision_features_mib": cache_mb}}
    config_path = tmp_path / "chat.yaml"
    config_path.write_text(yaml.safe_dump(config))
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fsdp, one = str(tmp_path / "fsdp"), str(tmp_path / "one")
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29523",
                             os.path.join(TESTS, "ddp_worker.py"), str(config_path), fsdp],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = subprocess.run([sys.executable, os.path.join(TESTS, "ddp_worker.py"), str(config_path), one,
                             "--single"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    with open(os.path.join(fsdp, "metrics.jsonl")) as f:
        fsdp_lines = [json.loads(line) for line in f]
    with open(os.path.join(one, "metrics.jsonl")) as f:
        one_lines = [json.loads(line) for line in f]
    fsdp_losses, one_losses = _losses(fsdp), _losses(one)
    assert sorted(fsdp_losses) == [1, 2, 3]
    assert all(abs(fsdp_losses[s] - one_losses[s]) < 1e-5 for s in fsdp_losses), (fsdp_losses, one_losses)
    held = [[m["val_loss/held"] for m in lines if "val_loss/held" in m] for lines in (fsdp_lines, one_lines)]
    assert len(held[0]) == len(held[1]) == 1 and abs(held[0][0] - held[1][0]) < 1e-5, held
    ranks = [load_file(os.path.join(fsdp, f"params_rank{r}.safetensors")) for r in range(2)]
    reference = load_file(os.path.join(one, "params_rank0.safetensors"))
    # (after 3 Adam steps at lr 1e-2 the weights moved ~3e-2; the two runs' float sums differ by ~1e-6 per step)
    assert all(torch.allclose(reference[k], ranks[0][k], atol=1e-4) for k in reference)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


@pytest.mark.parametrize("lm_kind", ["llama", "gpt2"])
def test_flops_count_the_lm_head_but_not_an_untied_embedding_lookup(make_model, lm_kind):
    from flamingo.train.flops import count, flops_per_sample, xattn_kv_parameters

    model, _ = make_model(lm_kind)
    embedding = model.lm.get_input_embeddings().weight
    tied = model.lm.get_output_embeddings().weight is embedding
    p_lm = count(model.lm) - (0 if tied else embedding.numel())
    # no media: no tower, no resampler and no visual K/V work
    text_only = 4 * p_lm * 10 + 6 * (count(model.xattn) - xattn_kv_parameters(model.xattn)) * 10
    assert xattn_kv_parameters(model.xattn) > 0
    assert flops_per_sample(model, 10, 0, 0, 0) == text_only


def test_gate_values_are_signed_for_scalar_gates_and_mean_abs_for_vector_gates(make_model):
    from flamingo.train.run_log import gate_values

    scalar, _ = make_model("llama", gates=-0.5)
    assert all(a == pytest.approx(math.tanh(-0.5)) and d == pytest.approx(math.tanh(-0.5))
               for a, d in gate_values(scalar).values())
    vector, _ = make_model("llama", gates=0.0, gate_type="vector")
    with torch.no_grad():
        for block in vector.xattn:
            block.attn_gate.copy_(torch.tensor([0.5, -0.5]).repeat(block.attn_gate.numel() // 2))
    values = gate_values(vector)
    assert set(values) == {str(i) for i in vector.xattn_layer_indices}
    assert all(a == pytest.approx(math.tanh(0.5)) and d == 0.0 for a, d in values.values())


def test_fsdp_trained_state_leaves_out_a_tied_frozen_alias(tmp_path):
    """A tied LM (GPT-2: lm_head.weight is the input embedding) under FSDP2: the gathered trained state holds the
    trained parameters only. DCP's `ignore_frozen_params` keeps the tied alias, whose frozenness it cannot see, and
    the final save then failed on it (one gloo process is enough to show it)."""
    import torch.distributed as dist

    from flamingo.tiny import tiny_flamingo
    from flamingo.train.parallel import apply_fsdp
    from flamingo.train.state import gather_trained_parameters

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/rendezvous")
    try:
        model, _ = tiny_flamingo("gpt2")
        assert model.lm.get_output_embeddings().weight is model.lm.get_input_embeddings().weight
        apply_fsdp(model, frozen="shard")
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(gather_trained_parameters(model)) == trained
    finally:
        dist.destroy_process_group()


def _ranks_failure(stderr: str) -> str:
    """What each rank said before a torchrun failure (the first rank to fail is often not the last to print)."""
    own = [line for line in stderr.splitlines() if not line.startswith(("W1", "I1")) and "DEBUG" not in line]
    return "\n".join(own[:60] + ["..."] + own[-60:]) if len(own) > 120 else "\n".join(own)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("distributed,fsdp_frozen,quantize,lora", [
    ("ddp", "shard", "int8", False), ("fsdp", "replicate", "nf4", True), ("fsdp", "shard", "none", True)])
def test_quantized_and_lora_runs_two_processes_equal_one_process(world, tmp_path, distributed, fsdp_frozen, quantize,
                                                                 lora):
    """Quantized frozen backbones (DDP; FSDP replicating them) and LoRA adapters on the LM (sharded with their layer
    under FSDP): two processes train the losses and weights of one process with the doubled batch."""
    if quantize != "none":
        pytest.importorskip("torchao")
    if lora:
        pytest.importorskip("peft")
    root, vision, lm, _ = world
    data = write_datasets(str(tmp_path / "same"), n_pairs=32, same_caption=True)
    config = train_config(str(tmp_path), vision, lm, data, steps=3, out=str(tmp_path / "unused"), batch_size=2,
                          interleaved=False)
    overrides = [f"train.distributed={distributed}", f"train.fsdp_frozen={fsdp_frozen}",
                 f"model.flamingo.quantize_frozen={quantize}"]
    if lora:
        overrides += ["model.flamingo.lm_lora.r=4", "model.flamingo.lm_lora.alpha=8"]
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29521",
                             os.path.join(TESTS, "ddp_worker.py"), config, two, *overrides], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, _ranks_failure(result.stderr)
    single = subprocess.run([sys.executable, os.path.join(TESTS, "ddp_worker.py"), config, one, "--single",
                             *overrides], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    two_losses, one_losses = _losses(two), _losses(one)
    assert sorted(two_losses) == [1, 2, 3]
    assert all(abs(two_losses[s] - one_losses[s]) < 1e-5 for s in two_losses), (two_losses, one_losses)
    ranks = [load_file(os.path.join(two, f"params_rank{r}.safetensors")) for r in range(2)]
    alone = load_file(os.path.join(one, "params_rank0.safetensors"))
    assert any("lora_" in k for k in alone) == lora
    assert ranks[0].keys() == ranks[1].keys() == alone.keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) and torch.allclose(alone[k], ranks[0][k], atol=1e-5)
               for k in alone)


def test_ddp_leaves_quantized_frozen_weights_out_of_its_broadcast_and_fsdp_will_not_shard_them(tmp_path):
    """torchao's quantized tensors cannot be broadcast (DDP's start-up sync) or split into shards (FSDP2): DDP skips
    them (each rank quantized the same weights), FSDP asks for `fsdp_frozen: replicate` (one gloo process shows it)."""
    pytest.importorskip("torchao")
    import torch.distributed as dist

    from flamingo.model.quantize import quantize_frozen
    from flamingo.tiny import tiny_flamingo
    from flamingo.train.parallel import apply_fsdp, wrap_ddp

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/rendezvous")
    try:
        model, _ = tiny_flamingo("llama")
        quantize_frozen(model, "int8")
        with pytest.raises(NotImplementedError):  # what DDP does with them unaided
            torch.nn.parallel.DistributedDataParallel(model)
        wrapped = wrap_ddp(model, torch.device("cpu"))
        assert wrapped.module is model
        with pytest.raises(ValueError, match="fsdp_frozen: replicate"):
            apply_fsdp(model, frozen="shard")
        apply_fsdp(model, frozen="replicate")
    finally:
        dist.destroy_process_group()


def test_torchs_cpp_notices_are_left_to_rank_0():
    """Ranks other than 0 load torch with TORCH_CPP_LOG_LEVEL=ERROR, unless the user set a level; with torch loaded
    already (here) the level cannot change, and nothing is set."""
    from flamingo.runtime.launch import cpp_log_level, quiet_cpp_notices_off_rank_0

    envs = ({}, {"RANK": "0"}, {"RANK": "1"}, {"RANK": "3", "TORCH_CPP_LOG_LEVEL": "INFO"})
    assert [cpp_log_level(env) for env in envs] == [None, None, "ERROR", None]
    assert "torch" in sys.modules and not quiet_cpp_notices_off_rank_0()


@pytest.mark.slow
def test_ddps_notice_that_no_parameter_went_unused_comes_from_rank_0_only(tmp_path):
    """DDP (find_unused_parameters=True) prints a C++ notice when a step uses every parameter, from every torchrun
    rank. `quiet_cpp_notices_off_rank_0`, called before torch loads, keeps it on rank 0: shown by a one-process gloo
    group whose environment says rank 0, then 1."""
    script = tmp_path / "notice.py"
    script.write_text(
        "from flamingo.runtime.launch import quiet_cpp_notices_off_rank_0\n"
        "quiet_cpp_notices_off_rank_0()\n"
        "import torch, torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/rendezvous', rank=0, world_size=1)\n"
        "model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2), find_unused_parameters=True)\n"
        "model(torch.ones(1, 2)).sum().backward()\n"
        "dist.destroy_process_group()\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CPP_LOG_LEVEL"}
    said = {}
    for rank in ("0", "1"):
        (tmp_path / "rendezvous").unlink(missing_ok=True)
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                                env={**env, "RANK": rank, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        said[rank] = "did not find any unused parameters" in result.stderr
    assert said == {"0": True, "1": False}


def test_leaving_the_process_group_exits_with_the_output_flushed(tmp_path):
    """`flamingo train` under torchrun ends this way: the group destroyed, buffered output written, no interpreter
    finalization (where gloo's worker threads could abort the process), the exit code kept."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import atexit, os, sys\n"
        "import torch.distributed as dist\n"
        "from flamingo.runtime import leave_process_group_and_exit\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:29525', rank=0, world_size=1)\n"
        "atexit.register(lambda: print('finalized'))\n"
        "print('written', end='')\n"
        "sys.stderr.write('also written')\n"
        "leave_process_group_and_exit(3)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout == "written" and result.stderr.endswith("also written")


def test_a_checkpoint_of_another_optimizer_kind_or_lora_is_refused_by_option(make_model):
    """Resuming with optim.kind or lm_lora changed failed inside torchao (lr is not a tensor, lerp_ on an 8-bit
    state) or torch (a size mismatch, a KeyError); the checkpoint's state now names what differs."""
    from flamingo.train.state import check_resumable

    model, _ = make_model(lm_lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]})
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    check_resumable("ck", {"optim_kind": "adamw"}, model, trained, "adamw")
    with pytest.raises(ValueError, match="written with optim.kind=adamw; the config says adamw8bit"):
        check_resumable("ck", {"optim_kind": "adamw"}, model, trained, "adamw8bit")
    wider = {n: torch.zeros(8, t.shape[1]) if "lora_A" in n else t for n, t in trained.items()}
    with pytest.raises(ValueError, match=r"lora_A.default.weight is \(8, 32\) there, \(4, 32\) in the model.*lm_lora"):
        check_resumable("ck", {}, model, wider, "adamw")
    bare, _ = make_model()
    with pytest.raises(ValueError, match="holds trained parameters this model does not train .*lora_A"):
        check_resumable("ck", {}, bare, trained, "adamw")
