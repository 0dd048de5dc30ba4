"""Sampled generation in an evaluation: a trial's seed fixes its draws (the same predictions every time it runs), other
seeds draw others, and the caller's torch random state is left as it was."""

import json

import pytest
import torch

from flamingo.eval import evaluate
from flamingo.tiny import tiny_flamingo

from helpers import make_vqa

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLED = dict(shots=[0], batch_size=2, progress=False,
               generation={"max_new_tokens": 4, "num_beams": 1, "do_sample": True})


def _raw(model, processor, data, out, **settings):
    """The raw generations of each trial of one evaluation."""
    results = evaluate(model, processor, "vqa", str(data), out_dir=str(out), **SAMPLED, **settings)
    return [[json.loads(line)["raw"] for line in (out / "predictions" / f"vqa_0shot_trial{run['trial']}.jsonl").open()]
            for run in results["runs"]]


def test_sampled_generation_is_reproducible_for_a_seed_and_leaves_torchs_state_alone(tmp_path):
    model, processor = tiny_flamingo()  # random weights: near-uniform next tokens, so draws differ between seeds
    data = make_vqa(tmp_path / "data")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = _raw(model, processor, data, tmp_path / "a", seed=0, trials=2)
    assert torch.equal(torch.get_rng_state(), state)  # the draws did not advance (or reseed) the caller's generator
    torch.manual_seed(7)  # another global state: the same draws
    assert _raw(model, processor, data, tmp_path / "b", seed=0, trials=2) == first
    assert first[0] != first[1]  # trial 1 (seed 1) draws its own samples
    assert _raw(model, processor, data, tmp_path / "c", seed=1, trials=1)[0] == first[1]
