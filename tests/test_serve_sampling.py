"""Per-row token choice (flamingo/serve/sampling.py): sampled rows draw from transformers' temperature and top-p
warped distribution (its nucleus exactly), a seeded generator per row, greedy rows at the argmax, suppressed ids never
chosen; penalties from the engine's per-token counts equal those from the token list."""

from __future__ import annotations

import pytest
import torch

from flamingo.serve.sampling import SamplingParams, adjust_logits, pick_tokens, row_generator


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


def _hf_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits (V,) -> transformers' warped distribution (V,): its Temperature then TopP warpers, softmax."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    row = TemperatureLogitsWarper(temperature)(None, logits[None] - logits.max())
    if top_p < 1.0:
        row = TopPLogitsWarper(top_p)(None, row)
    return row.softmax(dim=-1)[0]


@pytest.mark.parametrize("device_path", [False, True], ids=["cpu-topk", "one-sort"])
def test_sampled_tokens_stay_in_hf_nucleus_and_follow_its_distribution(device_path, monkeypatch):
    """Drawn tokens are never outside transformers' top-p nucleus (nor suppressed), and their frequencies match its
    warped distribution; on the CPU's top-k shortcut (a peaked row, a flat row that falls back to the sort) and the
    one-sort path a device takes (forced here on the CPU)."""
    import flamingo.serve.sampling as sampling

    if device_path:  # what draw_tokens runs when probs are not on the CPU
        monkeypatch.setattr(sampling, "_sorts_all", lambda probs: True)
    monkeypatch.setattr(sampling, "TOP_P_WIDTHS", (4, 8))  # small V: the top-k shortcuts and the sort all run
    torch.manual_seed(0)
    V, N = 40, 10000
    logits = torch.stack([torch.randn(V) * 3, torch.randn(V) * 0.3, torch.randn(V) * 2, torch.randn(V)])  # (4, V)
    params = [SamplingParams(8, temperature=0.7, top_p=0.9, seed=1),  # nucleus within the top-k
              SamplingParams(8, temperature=1.3, top_p=0.5, seed=2),  # flat: past the top-k, the sort fallback
              SamplingParams(8, temperature=1.0, seed=3), SamplingParams(8, temperature=0.0)]
    suppress = [int(logits[2].argmax())]
    # N draws of each row at once: N copies of the batch, copy i sampling with its choice i's generator
    generators = [row_generator(p, i, torch.device("cpu")) for i in range(N) for p in params]
    draws = sampling.pick_tokens(logits.repeat(N, 1), params * N, generators, suppress).view(N, 4)
    assert (draws[:, 3] == logits[3].argmax()).all()  # greedy as before
    for b in range(3):
        row = logits[b].clone()
        row[suppress] = -float("inf")
        want = _hf_probs(row, params[b].temperature, params[b].top_p).double()
        freq = torch.bincount(draws[:, b], minlength=V).double() / N
        assert bool((want[freq > 0] > 0).all()), f"row {b} drew a token outside HF's nucleus"
        assert 0.5 * (freq - want).abs().sum() < 0.04, f"row {b}: frequencies far from HF's distribution"


@pytest.mark.parametrize("V", [50, 1000])
def test_nucleus_is_hf_toppwarpers_set(V, monkeypatch):
    """Over many random rows, the tokens a top-p row can draw are exactly those HF's TopP warper keeps (the top-k
    shortcut with its sort fallback, and the device's one sort)."""
    import flamingo.serve.sampling as sampling

    monkeypatch.setattr(sampling, "TOP_P_WIDTHS", (16, 64))
    widths = []
    topk = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda t, k, *a, **kw: widths.append(k) or topk(t, k, *a, **kw))
    torch.manual_seed(1)
    for i in range(60):
        logits = torch.randn(V) * (0.5 + i % 5)
        top_p = (0.3, 0.5, 0.8, 0.9, 0.95)[i % 5]
        hf = _hf_probs(logits, 1.0, top_p) > 0
        probs = logits.softmax(-1)
        # the uniform 1 - 1 ulp lands on the nucleus's last (least likely) token: the largest index drawable
        last = torch.tensor([1.0 - 2**-24])
        top = sampling._draw_nucleus(probs, top_p, last)
        top_sorted = sampling._draw_sorted(probs[None], [top_p], last[None])[0]
        order = probs.sort(descending=True).indices
        assert int(hf.sum()) == int((order == top).nonzero()) + 1 == int((order == top_sorted).nonzero()) + 1
    if V > 64:  # every way to the nucleus was taken: the first top-k, the wider one, the whole sort
        assert {16, 64} <= set(widths) and widths.count(64) < widths.count(16)


def test_penalty_counts_equal_the_token_list():
    """The counts per id (V,) the engine keeps penalise a row exactly as the list of its generated tokens does."""
    torch.manual_seed(2)
    logits = torch.randn(2, 30)
    generated = [[3, 3, 7, 1, 3, 29], []]
    counts = [torch.bincount(torch.tensor(g, dtype=torch.long), minlength=30).float() for g in generated]
    params = [SamplingParams(8, temperature=0.0, frequency_penalty=0.7, presence_penalty=0.4,
                             logit_bias=((5, 2.0),))] * 2
    for b in range(2):
        by_list, by_counts = logits[b].clone(), logits[b].clone()
        adjust_logits(by_list, params[b], generated[b])
        adjust_logits(by_counts, params[b], counts[b])
        assert torch.allclose(by_list, by_counts)
    assert pick_tokens(logits * 0, params, [None, None], [], generated=counts).tolist() == \
        pick_tokens(logits * 0, params, [None, None], [], generated=generated).tolist()


def test_the_engine_passes_a_penalised_row_its_token_counts(tmp_path, monkeypatch, one_thread):
    """At each decode step the engine hands a penalised row its generated tokens' counts per id (V,), up to date
    with every token taken, and an unpenalised row its token list."""
    import flamingo.serve.engine as engine_module

    from serve_helpers import engine_for, save_tiny_model, submit_job

    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=2)
    seen = []

    def recording(logits, params, generators, suppress, generated=None, constraints=None):
        kept = [g.clone() if isinstance(g, torch.Tensor) else g for g in generated or [None] * len(params)]
        seen.extend(zip(params, kept))  # a copy: the engine's counts go on changing
        return pick_tokens(logits, params, generators, suppress, generated=generated, constraints=constraints)

    monkeypatch.setattr(engine_module, "pick_tokens", recording)
    engine.start()
    try:
        penalised = SamplingParams(6, temperature=0.0, frequency_penalty=0.5, presence_penalty=0.1)
        plain = SamplingParams(6, temperature=0.0)
        waits = [submit_job(engine, "Q:", [], penalised), submit_job(engine, "A:", [], plain)]
        answers = [wait()[0] for wait in waits]
    finally:
        engine.stop(0.0)
    vocab = engine.model.lm.get_output_embeddings().weight.shape[0]
    steps = {p: [g for q, g in seen if q is p and g is not None] for p in (penalised, plain)}
    assert len(steps[penalised]) == len(answers[0]) - 1 and all(isinstance(g, list) for g in steps[plain])
    for i, counts in enumerate(steps[penalised]):  # step i + 1 follows the answer's first i + 1 tokens
        assert isinstance(counts, torch.Tensor) and counts.shape == (vocab,)
        want = torch.bincount(torch.tensor(answers[0][:i + 1]), minlength=vocab).float()
        assert torch.equal(counts, want), i


def test_the_uniforms_extremes_never_draw_a_zero_probability_token():
    """Inverse CDF at a uniform of 0 or at the top (where uniform x mass can round up to the mass) lands on a token
    of positive probability, never a suppressed or cut one before or after it."""
    from flamingo.serve.sampling import _draw_cdf

    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert _draw_cdf(probs, torch.tensor([[0.0], [0.0]])).tolist() == [[1], [2]]
    assert _draw_cdf(probs, torch.tensor([[1.0], [1.0]])).tolist() == [[2], [2]]


@pytest.mark.parametrize("device_path", [False, True], ids=["cpu-topk", "one-sort"])
def test_a_seeded_row_draws_alike_alone_and_beside_a_top_p_row(device_path, monkeypatch):
    """On a device the nucleus rows are drawn after one sort: a top_p 1 row beside them drew from its sorted
    probabilities, another token for the same uniform, so a seeded request's tokens hung on its neighbours."""
    import flamingo.serve.sampling as sampling

    if device_path:
        monkeypatch.setattr(sampling, "_sorts_all", lambda probs: True)
    torch.manual_seed(0)
    logits = torch.randn(2, 50) * 2  # (2, V)
    plain, nucleus = SamplingParams(8, temperature=1.0, seed=7), SamplingParams(8, temperature=1.0, top_p=0.9, seed=3)
    for step in range(30):
        alone = pick_tokens(logits[:1], [plain], [row_generator(plain, step, torch.device("cpu"))], [])
        beside = pick_tokens(logits, [plain, nucleus], [row_generator(plain, step, torch.device("cpu")),
                                                        row_generator(nucleus, step, torch.device("cpu"))], [])
        assert int(beside[0]) == int(alone[0]), step
