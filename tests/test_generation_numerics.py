"""Generation settings at the edges of float arithmetic: beam sampling at a tiny temperature is beam search (its
limit, not transformers' NaN probabilities or lost beams), and a repetition penalty too small for float32 is refused
by name (not NaN probabilities)."""

import pytest
import torch
from transformers import GenerationConfig, TemperatureLogitsWarper

from flamingo.model.generation import BEAM_SAMPLING_MIN_TEMPERATURE, MIN_REPETITION_PENALTY
from flamingo.tiny import random_image

PROMPT = "<image>Question: what is this? Short answer:"


def _new(model, batch, **kwargs) -> list[list[int]]:
    out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, **kwargs)
    return out[:, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("temperature", (1e-6, 1e-30, 1e-40, 5e-324))
def test_beam_sampling_at_a_tiny_temperature_is_beam_search(make_model, temperature):
    model, processor = make_model("llama", gates=0.9)
    batch = processor(PROMPT, images=[random_image(1)])
    beams = _new(model, batch, num_beams=3, num_return_sequences=2)
    torch.manual_seed(0)
    assert _new(model, batch, num_beams=3, num_return_sequences=2, do_sample=True, temperature=temperature) == beams
    config = GenerationConfig(num_beams=3, do_sample=True, temperature=temperature, top_k=50)
    assert _new(model, batch, generation_config=config) == beams[:1]
    assert config.do_sample and config.temperature == temperature  # the caller's config stays as it was


def test_beam_sampling_from_the_bound_up_is_transformers_own(make_model):
    """From the bound up, beam sampling draws what transformers' temperature warper draws, seed for seed."""
    model, processor = make_model("llama", gates=0.9)
    batch = processor(PROMPT, images=[random_image(1)])
    for temperature in (BEAM_SAMPLING_MIN_TEMPERATURE, 0.7):
        for seed in range(2):
            torch.manual_seed(seed)
            ours = _new(model, batch, num_beams=3, do_sample=True, temperature=temperature)
            torch.manual_seed(seed)
            theirs = _new(model, batch, num_beams=3, do_sample=True,
                          logits_processor=[TemperatureLogitsWarper(temperature)])
            assert ours == theirs


@pytest.mark.parametrize("penalty", (1e-40, 1e-8, MIN_REPETITION_PENALTY / 2, 0.0, -1.0, float("inf"), float("nan")))
def test_a_repetition_penalty_out_of_range_is_refused(make_model, penalty):
    model, processor = make_model("llama")
    batch = processor(PROMPT, images=[random_image(1)])
    for do_sample in (True, False):
        with pytest.raises(ValueError, match="repetition_penalty=.*at least 0.0001"):
            _new(model, batch, do_sample=do_sample, repetition_penalty=penalty)
    with pytest.raises(ValueError, match="repetition_penalty="):
        _new(model, batch, generation_config=GenerationConfig(do_sample=True, repetition_penalty=penalty))


def test_a_repetition_penalty_in_range_samples_finite_probabilities(make_model):
    model, processor = make_model("llama", gates=0.9)
    batch = processor(PROMPT, images=[random_image(1)])
    for penalty in (MIN_REPETITION_PENALTY, 0.5, 1.3, 1e30):
        torch.manual_seed(0)
        out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=True, repetition_penalty=penalty,
                             output_scores=True, return_dict_in_generate=True)
        probs = torch.stack(out.scores).softmax(-1)
        assert not probs.isnan().any(), penalty
