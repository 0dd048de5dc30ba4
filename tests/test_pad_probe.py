"""Left-padded prompts: a batch of prompts of several lengths runs only on an LM that computes a padded prompt as the
prompt alone (`Flamingo.pads_exactly`, probed once per model). LMs that ignore the attention mask (RWKV) or run their
recurrence over the padding (RecurrentGemma) are refused by generate and score_batch, naming batch size 1; attention
LMs pass, batch as one by one, and pay for the probe once. Tiny random configs; an architecture the installed
transformers lacks is skipped."""

import pytest
import torch
from test_arch_checks import SMALL, flamingo_on

from flamingo.tiny import random_image

LEAKY_PADDERS = {  # RWKV ignores the mask; RecurrentGemma's recurrent blocks run over the padding
    "rwkv": dict(
        hidden_size=32, num_hidden_layers=4, attention_hidden_size=32, intermediate_size=64, context_length=64
    ),
    "recurrent_gemma": dict(SMALL, lru_width=32, block_types=["recurrent", "attention"], attention_window_size=8),
}
PROMPTS = ["<image>A photo of two", "<image>Hi"]


def padded_batch(processor) -> dict:
    batch = processor(PROMPTS, images=[[random_image(0)], [random_image(1)]])
    assert not batch["attention_mask"].all()  # the second prompt is left-padded
    return batch


def alone(processor, i: int) -> dict:
    return processor(PROMPTS[i], images=[random_image(i)])


def media(batch: dict) -> dict:
    return {"attention_mask": batch["attention_mask"], "images": batch["images"], "num_media": batch["num_media"]}


@pytest.mark.parametrize("model_type", sorted(LEAKY_PADDERS))
def test_left_padded_batches_are_refused_for_an_lm_that_lets_the_padding_in(model_type):
    """The LM really computes the padded prompt otherwise than alone; generate and score_batch refuse the padded
    batch (naming the LM and batch size 1) instead of answering other tokens; one prompt alone still runs."""
    model, processor = flamingo_on(model_type, **LEAKY_PADDERS[model_type])
    batch = padded_batch(processor)
    ids, mask = batch["input_ids"][1:], batch["attention_mask"][1:]  # (1, T): the padded prompt
    keep = mask[0].bool()
    with torch.no_grad():
        padded = model.lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[0, keep]
        bare = model.lm(input_ids=ids[:, keep], use_cache=False).logits[0]
    assert (padded - bare).abs().max() > 1e-2
    assert not model.pads_exactly()
    refusal = rf"this LM \({type(model.lm).__name__}, .* \(batch size 1; flamingo eval: --batch-size 1\)"
    with pytest.raises(ValueError, match="generate with a left-padded batch: " + refusal):
        model.generate(**batch, max_new_tokens=2)
    with pytest.raises(ValueError, match="score_batch with left-padded contexts: " + refusal):
        model.score_batch(batch["input_ids"], [[[40]], [[41]]], **media(batch))
    one = alone(processor, 1)
    assert model.generate(**one, max_new_tokens=2, min_new_tokens=2).shape == (1, one["input_ids"].shape[1] + 2)


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
def test_attention_lms_pass_the_probe_once_and_batch_as_one_by_one(lm, make_model, monkeypatch):
    """Unpadded calls never run the probe; the first padded call runs it once, later ones not again; the padded
    batch generates and scores what each prompt does alone."""
    model, processor = make_model(lm)
    probes = []
    probe = model._lm_pads_exactly
    monkeypatch.setattr(model, "_lm_pads_exactly", lambda: probes.append(1) or probe())
    singles = [model.generate(**alone(processor, i), max_new_tokens=3, min_new_tokens=3)[0, -3:] for i in range(2)]
    single_scores = [
        model.score(alone(processor, i)["input_ids"], [[40, 41], [42]], images=alone(processor, i)["images"])
        for i in range(2)
    ]
    assert probes == []  # unpadded: no probe
    batch = padded_batch(processor)
    batched = model.generate(**batch, max_new_tokens=3, min_new_tokens=3)[:, -3:]
    assert probes == [1]
    scores = model.score_batch(batch["input_ids"], [[[40, 41], [42]]] * 2, **media(batch))
    model.generate(**batch, max_new_tokens=1)
    assert probes == [1]  # cached
    assert torch.equal(batched, torch.stack(singles))
    for got, want in zip(scores, single_scores):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
def test_the_probe_passes_in_bf16(lm, make_model):
    """The probe's 'alone' check is relative to what the padding would change, so bf16 rounding does not fail it."""
    model, _ = make_model(lm)
    assert model.to(torch.bfloat16)._lm_pads_exactly()


@pytest.mark.parametrize("model_type", sorted(LEAKY_PADDERS))
def test_the_server_refuses_an_lm_that_lets_the_padding_in_at_startup(model_type):
    """The server's batch runs rows of several lengths: RWKV, whose empty cache looks like attention layers (its
    every request failed with an AttributeError), is refused when the engine is built, as RecurrentGemma's recurrent
    cache layers already were."""
    from flamingo.serve.engine import Engine

    model, processor = flamingo_on(model_type, **LEAKY_PADDERS[model_type])
    with pytest.raises(ValueError, match=rf"continuous batching .*({type(model.lm).__name__}|cache layers)"):
        Engine(model, processor)
