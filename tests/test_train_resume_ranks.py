"""Resuming across process layouts: a checkpoint written under FSDP resumes in one process (or DDP) and the
reverse, each rank's random generators are saved and restored (exact DDP resume with dropout), and a run resumed by
more processes than wrote the checkpoint gives the extra ranks rank 0's data positions and fresh seeds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from flamingo.data.build import build_source
from flamingo.data.mixture import next_batch
from flamingo.tiny import tiny_flamingo
from flamingo.train.optim import make_optimizer, make_scheduler
from flamingo.train.parallel import apply_fsdp
from flamingo.train.state import (
    gather_training_state,
    latest_checkpoint,
    load_checkpoint,
    rank_entry,
    restore_rng,
    rng_state,
    save_checkpoint,
)

from helpers import training_batch
from train_fixtures import train_config, write_datasets

TESTS = os.path.dirname(os.path.abspath(__file__))


def _setup(sharded: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model, _ = tiny_flamingo("llama")  # the same weights every call (seeded)
    model.train()
    if sharded:
        apply_fsdp(model)
    optimizer = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8)
    return model, optimizer, make_scheduler(optimizer, "cosine", 1, 10)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batch: dict) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def _full(value: Any) -> Any:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Each trained parameter's weight and optimizer moments, whole, by parameter name."""
    return {n: {"weight": _full(p).detach().clone(), **{k: _full(v).clone() for k, v in optimizer.state[p].items()}}
            for n, p in model.named_parameters() if p.requires_grad}


def test_a_checkpoint_moves_between_fsdp_and_one_process(tmp_path, one_thread):
    """FSDP writes its optimizer state keyed by parameter name, one process and DDP by index; a resume read the
    format of its own layout and failed on the other's (KeyError 'param_groups' / 'fsdp_full'). Now either loads
    into the other: the same weights and moments, and the next steps equal the uninterrupted run's. 8-bit states are
    refused by name (one gloo process holds the FSDP model)."""
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/rendezvous")
    try:
        _, processor = tiny_flamingo("llama")
        batch = training_batch(processor, ["<image>a red square<|endofchunk|>", "<image>x y z"], [1, 1])
        for written, resumed in ((False, True), (True, False)):
            straight = _setup(written)
            for _ in range(2):
                _step(*straight, batch)
            out = str(tmp_path / f"written-{'fsdp' if written else 'one'}")
            trained, optimizer_state = gather_training_state(*straight[:2])
            assert ("fsdp_full" in optimizer_state) == written
            save_checkpoint(out, 2, trained, optimizer_state, straight[2], {"optim_kind": "adamw"}, keep_last=0)
            moved = _setup(resumed)
            load_checkpoint(latest_checkpoint(out), *moved, torch.device("cpu"), "adamw")
            a, b = _by_name(*straight[:2]), _by_name(*moved[:2])
            assert a.keys() == b.keys() and all(a[n].keys() == b[n].keys() for n in a)
            assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n]), "other weights or moments"
            assert moved[2].last_epoch == 2 and moved[1].param_groups[0]["lr"] == straight[1].param_groups[0]["lr"]
            for _ in range(2):  # the steps after the resume: the uninterrupted run's, within fp32 noise
                assert _step(*moved, batch) == pytest.approx(_step(*straight, batch), abs=1e-6)
            a, b = _by_name(*straight[:2]), _by_name(*moved[:2])
            assert all(torch.allclose(a[n][k], b[n][k], atol=1e-6) for n in a for k in a[n])

            state_json = os.path.join(latest_checkpoint(out), "state.json")
            with open(state_json, "w") as f:
                json.dump({"optim_kind": "adamw8bit", "rng": {}}, f)
            with pytest.raises(ValueError, match="optim.kind=adamw8bit.*resume it (under torchrun )?with "
                                                 f"train.distributed={'fsdp' if written else 'ddp'}"):
                load_checkpoint(latest_checkpoint(out), *moved, torch.device("cpu"), "adamw8bit")
    finally:
        dist.destroy_process_group()


def test_a_rank_the_checkpoint_did_not_have_takes_rank_0s_data_and_a_fresh_seed(tmp_path):
    """Resumed by more processes than wrote it: an extra rank indexed past the per-rank lists (a bare IndexError).
    It now reads rank 0's data positions (the data layer restarts the epoch: another world size) and seeds its
    generators as a fresh run's rank does (train.seed + rank); the others restore their own states."""
    data = [{"pairs": {"epoch": 0}}, {"pairs": {"epoch": 1}}]
    assert rank_entry(data, 1) == data[1] and rank_entry(data, 2) == data[0]
    assert rank_entry(data[0], 3) == data[0]  # one process wrote it: every rank reads its positions

    class Scheduler:
        def state_dict(self) -> dict:
            return {}

    states = []
    for seed in (1, 2):  # two ranks' generators, different
        torch.manual_seed(seed)
        states.append(rng_state())
    path = save_checkpoint(str(tmp_path), 1, {"w": torch.zeros(1)}, {"state": {}, "param_groups": []}, Scheduler(),
                           {"world_size": 2}, keep_last=0, rng=states)
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    for rank, expected_seed in ((0, 1), (1, 2), (2, 7)):
        torch.manual_seed(123)
        assert restore_rng(path, state, rank, seed=5, device=torch.device("cpu")) == (rank < 2)
        drawn = torch.rand(4)
        torch.manual_seed(expected_seed)
        assert torch.equal(drawn, torch.rand(4)), rank


def test_drifting_ranks_read_each_epoch_once_and_resume_exactly(world, tmp_path):
    """Shares of whole files of unequal sizes give the ranks unequal epochs (here 3 and 2 of 5 files), so their
    epochs drift apart as they step together (docs/training.md, "Epochs under torchrun"). Each epoch is still read
    once: the ranks' epoch e together hold every sample once. Positions saved mid-drift resume exactly."""
    root, _, _, data = world
    with open(data["pairs"]) as f:
        rows = [json.loads(line) for line in f][:40]
    start = 0
    for k, size in enumerate((12, 8, 8, 8, 4)):
        with open(tmp_path / f"part{k}.jsonl", "w") as f:
            for row in rows[start:start + size]:
                f.write(json.dumps({**row, "image": os.path.join(os.path.dirname(data["pairs"]), row["image"])}) + "\n")
        start += size
    _, processor = tiny_flamingo("llama")
    section = SimpleNamespace(name="pairs", kind="pairs", path=str(tmp_path), batch_size=4,
                              options={"max_tokens": 32, "shuffle_buffer": 8})

    def sources() -> list:
        return [build_source(section, processor, rank=r, world_size=2, seed=0) for r in range(2)]

    ranks, iterators = sources(), [{}, {}]
    reads: list[list[tuple[int, str]]] = [[], []]  # per rank: (epoch, sample key)
    for step in range(30):
        if step == 15:
            saved = [source.state_dict() for source in ranks]
        for r, source in enumerate(ranks):
            batch = next_batch({"pairs": source}, iterators[r], "pairs")
            reads[r] += [(source.epoch, key) for key in batch["keys"]]
    assert saved[0]["epoch"] != saved[1]["epoch"] and ranks[0].epoch < ranks[1].epoch  # drifted
    for epoch in range(ranks[0].epoch):  # the epochs both ranks finished
        keys = [key for r in range(2) for e, key in reads[r] if e == epoch]
        assert len(keys) == len(set(keys)) == 40, epoch
    resumed, iterators = sources(), [{}, {}]
    for source, state in zip(resumed, saved):
        source.load_state_dict(state)
    again: list[list[tuple[int, str]]] = [[], []]
    for _ in range(15):
        for r, source in enumerate(resumed):
            batch = next_batch({"pairs": source}, iterators[r], "pairs")
            again[r] += [(source.epoch, key) for key in batch["keys"]]
    assert again == [reads[r][-len(again[r]):] for r in range(2)]


def _losses(output_dir: str) -> dict[int, float]:
    losses = {}
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "loss" in m:
                losses[m["step"]] = m["loss"]
    return losses


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_resume_with_dropout_is_exact_and_more_ranks_resume(world, tmp_path):
    """Two DDP ranks with LoRA dropout on captions of unequal length (the ranks' generators drift apart): only rank
    0's generator state was saved and every rank restored it, so the resumed losses differed from the first resumed
    step. Each rank's own is now saved: steps 3-4 and the final weights are bit-identical. The ranks draw from
    train.seed + rank (other masks on same-shape batches). The same checkpoint resumes under FSDP (the index-keyed
    optimizer state converted) with DDP's losses, and under three processes (an IndexError before) with a warning."""
    pytest.importorskip("peft")
    root, vision, lm, _ = world
    data = write_datasets(str(tmp_path / "data"), n_pairs=32, same_caption=False)
    config = train_config(str(tmp_path), vision, lm, data, steps=4, out=str(tmp_path / "unused"), batch_size=2,
                          interleaved=False, save_every=2, progress=False)
    lora = ["model.flamingo.lm_lora.r=4", "model.flamingo.lm_lora.alpha=8", "model.flamingo.lm_lora.dropout=0.3"]
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    temp = tmp_path / "tmp"  # torchrun's temporary directories, removed with the test's
    temp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}

    def launch(out: str, processes: int = 2, *extra: str) -> str:
        result = subprocess.run([torchrun, "--nproc_per_node", str(processes), "--master_port", "29541",
                                 os.path.join(TESTS, "ddp_worker.py"), config, out, *lora, *extra], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    def from_step_2(name: str) -> str:
        out = str(tmp_path / name)
        os.makedirs(os.path.join(out, "checkpoints"))
        shutil.copytree(os.path.join(straight, "checkpoints", "step_00000002"),
                        os.path.join(out, "checkpoints", "step_00000002"))
        return out

    straight = str(tmp_path / "straight")
    launch(straight)
    seeds = [(tmp_path / "straight" / f"seed_rank{r}.json").read_text() for r in range(2)]
    assert seeds == ["0", "1"]  # each rank's generators start from train.seed + rank
    resumed = from_step_2("resumed")
    launch(resumed)
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [3, 4] and all(b[s] == a[s] for s in b), (a, b)
    final = [load_file(os.path.join(d, "final", "flamingo.safetensors")) for d in (straight, resumed)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])

    fsdp = from_step_2("fsdp")
    launch(fsdp, 2, "train.distributed=fsdp")
    c = _losses(fsdp)
    assert sorted(c) == [3, 4] and all(abs(c[s] - a[s]) < 1e-5 for s in c), (a, c)

    three = from_step_2("three")
    said = launch(three, 3)
    assert "written by 2 process(es), resumed by 3: not an exact resume" in said
    assert sorted(_losses(three)) == [3, 4] and os.path.isdir(os.path.join(three, "final"))
