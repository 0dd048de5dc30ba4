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
