"""Per-row token choice (flamingo/serve/sampling.py): transformers' temperature and top-p warpers per row, a seeded
generator per row, greedy rows at the argmax, suppressed ids never chosen."""

from __future__ import annotations

import torch

from flamingo.serve.sampling import SamplingParams, pick_tokens, row_generator


def test_rows_sample_by_their_own_settings_and_greedy_rows_take_the_argmax():
    logits = torch.log(torch.tensor([[0.05, 0.9, 0.05, 0.0], [0.3, 0.3, 0.2, 0.2], [0.1, 0.2, 0.3, 0.4]]))
    params = [SamplingParams(8, temperature=1.0, top_p=0.8, seed=1),  # only the 0.9 token is within top-p 0.8
              SamplingParams(8, temperature=0.0),  # greedy: the argmax (first of a tie)
              SamplingParams(8, temperature=1.0, seed=2)]
    generators = [row_generator(p, 0, torch.device("cpu")) for p in params]
    picks = [pick_tokens(logits, params, generators, suppress=[3]).tolist() for _ in range(50)]
    assert {p[0] for p in picks} == {1} and {p[1] for p in picks} == {0}
    assert {p[2] for p in picks} <= {0, 1, 2} and len({p[2] for p in picks}) > 1  # sampled, never the suppressed id
    again = [row_generator(p, 0, torch.device("cpu")) for p in params]
    assert [pick_tokens(logits, params, again, suppress=[3]).tolist() for _ in range(50)] == picks  # the seed repeats


def test_a_tiny_temperature_takes_the_argmax_not_nan():
    """A temperature near 0 (down to one float32 and float64 cannot hold) samples the likeliest token, as 0 does."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -float("inf")], [9.0, -4.0, 8.5, 0.0]])
    for temperature in (5e-324, 1e-300, 1e-40, 1e-30):
        params = [SamplingParams(8, temperature=temperature, seed=0)] * 2
        generators = [row_generator(p, 0, torch.device("cpu")) for p in params]
        assert pick_tokens(logits, params, generators, suppress=[]).tolist() == [1, 0]


def test_any_seed_is_taken_wrapped_into_64_bits():
    """torch seeds take 64 bits: a seed (plus its choice) outside them wraps, as a negative seed already did."""
    def draws(seed: int, choice: int) -> list[float]:
        generator = row_generator(SamplingParams(8, seed=seed), choice, torch.device("cpu"))
        return torch.rand(3, generator=generator).tolist()

    assert draws(2**64 - 1, 1) == draws(0, 0)
    assert draws(2**70 + 5, 0) == draws(5, 0)
    assert draws(-1, 0) == draws(2**64 - 1, 0)
