"""One temperature rule for `generate(do_sample=True)` and the server's sampler (`tempered_logits`): the logits
shifted to a max of 0, then divided by the temperature kept above 0 in their dtype. A tiny temperature samples the
likeliest token (as greedy does) instead of NaN probabilities; any other samples the distribution it did."""

import pytest
import torch
from transformers import TemperatureLogitsWarper

from flamingo.model.generation import tempered_logits
from flamingo.serve.sampling import SamplingParams, pick_tokens, row_generator
from flamingo.tiny import random_image

PROMPT = "<image>Question: what is this? Short answer:"
TINY = (1e-40, 1e-300, 5e-324)  # past float32's range as a divisor; 0 in float32; 0 in float32 and near 0 in float64


def _new(model, batch, **kwargs) -> list[int]:
    out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, **kwargs)
    return out[0, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("temperature", TINY)
def test_generate_at_a_tiny_temperature_is_greedy(make_model, temperature):
    model, processor = make_model("llama")
    batch = processor(PROMPT, images=[random_image(1)])
    greedy = _new(model, batch)
    torch.manual_seed(0)
    assert _new(model, batch, do_sample=True, temperature=temperature) == greedy
    assert _new(model, batch, do_sample=True, temperature=temperature, top_k=5, top_p=0.9) == greedy


def test_generate_samples_as_transformers_warper_does(make_model):
    """At an ordinary temperature the draws are those of transformers' own temperature warper, seed for seed."""
    model, processor = make_model("llama", gates=0.9)
    batch = processor(PROMPT, images=[random_image(1)])
    for seed in range(3):
        torch.manual_seed(seed)
        ours = _new(model, batch, do_sample=True, temperature=0.7, top_k=20)
        torch.manual_seed(seed)
        theirs = _new(model, batch, do_sample=True, top_k=20, logits_processor=[TemperatureLogitsWarper(0.7)])
        assert ours == theirs


def test_tempered_logits_keep_the_distribution_and_split_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, -float("inf")], [2.0, -1.0, 0.5, 1.0]])
    for t in (0.5, 1.0, 2.0):
        torch.testing.assert_close(tempered_logits(logits, t).softmax(-1), (logits / t).softmax(-1))
    for t in (*TINY, torch.tensor([[1e-40], [0.0]])):
        probs = tempered_logits(logits, t).softmax(-1)
        assert torch.equal(probs, torch.tensor([[0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("temperature", TINY)
def test_the_server_at_a_tiny_temperature_takes_the_argmax(temperature):
    logits = torch.tensor([[1.0, 3.0, 2.0, -float("inf")], [9.0, -4.0, 8.5, 0.0]])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        params = [SamplingParams(8, temperature=temperature, seed=0)] * 2
        generators = [row_generator(p, 0, torch.device("cpu")) for p in params]
        assert pick_tokens(logits.to(dtype), params, generators, suppress=[]).tolist() == [1, 0]
