"""`Flamingo.forward` called as a transformers user calls an HF model: labels on a left- or right-padded batch give
each row its loss alone, a cache continues a padded batch at the right positions, the LM's hidden states and
attentions come back, `return_dict=False` gives a tuple, and what forward cannot do is refused by name."""

from __future__ import annotations

import pytest
import torch

from flamingo.tiny import random_image, tiny_flamingo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batchs_loss_is_the_token_weighted_mean_of_its_rows_alone(side):
    model, processor = tiny_flamingo("llama", gates=0.8)
    batch = processor(
        ["a cat<image>two dogs and more", "hi<image>x"],
        images=[[random_image(1)], [random_image(3)]],
        padding_side=side,
    )
    assert not bool(batch["attention_mask"].all())  # one row is padded
    total, tokens = 0.0, 0
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
        for i in range(2):
            ids = batch["input_ids"][i][batch["attention_mask"][i].bool()][None]
            alone = model(ids, images=batch["images"][i : i + 1], num_media=batch["num_media"][i : i + 1], labels=ids)
            total += alone.loss.item() * alone.loss_tokens.item()
            tokens += alone.loss_tokens.item()
    assert out.loss_tokens.item() == tokens
    assert out.loss.item() == pytest.approx(total / tokens, abs=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_cache_continues_a_left_padded_batch_at_its_rows_positions(kind):
    model, processor = tiny_flamingo(kind, gates=0.8)
    batch = processor(["A red circle and a blue square", "hi there"])  # row 1 left-padded
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not bool(mask[1].all())
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits[:, -1]  # (B, V)
        head = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=head.cache, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_padded_batch_in_chunks_on_a_fresh_cache_is_the_whole_batch(kind):
    """A custom loop's habit: the first chunk on a fresh `DynamicCache()`, the next on what it returns, labels with
    it. The first chunk counted the left padding as positions (a gpt2 row off by 0.39), and labels with a cache
    (the mask spanning the cached tokens) failed inside `loss_targets`."""
    from transformers import DynamicCache

    model, processor = tiny_flamingo(kind, gates=0.8)
    batch = processor(["a photo of a cat and a dog", "hi there"])  # row 1 left-padded
    ids, mask = batch["input_ids"], batch["attention_mask"]
    k = ids.shape[1] - 2
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask)
        first = model(input_ids=ids[:, :k], attention_mask=mask[:, :k], cache=DynamicCache(), use_cache=True)
        second = model(input_ids=ids[:, k:], attention_mask=mask, cache=first.cache, labels=ids[:, k:])
    real = mask.bool()  # a padding column's logits are nobody's
    torch.testing.assert_close(first.logits[real[:, :k]], whole.logits[:, :k][real[:, :k]], atol=1e-5, rtol=0)
    torch.testing.assert_close(second.logits, whole.logits[:, k:], atol=1e-5, rtol=0)
    assert torch.isfinite(second.loss) and int(second.loss_tokens) == 2  # one target per row in the last chunk


def test_logits_to_keep_as_positions_goes_to_the_lm():
    """transformers takes `logits_to_keep` as an int or a tensor of positions: a tensor failed in forward's own check
    ("Boolean value of Tensor ... ambiguous")."""
    model, processor = tiny_flamingo("llama", gates=0.8)
    ids = processor("a photo of a cat and a dog")["input_ids"]
    with torch.no_grad():
        kept = model(input_ids=ids, logits_to_keep=torch.tensor([2, 5])).logits
        whole = model(input_ids=ids).logits
    torch.testing.assert_close(kept, whole[:, [2, 5]], atol=1e-6, rtol=0)


def test_hidden_states_and_attentions_come_back():
    model, processor = tiny_flamingo("gpt2", gates=0.8, lm_overrides={"attn_implementation": "eager"})
    batch = processor(["<image>a cat", "hello there<image>x"], images=[[random_image(1)], [random_image(3)]])
    b, t = batch["input_ids"].shape
    with torch.no_grad():
        plain = model(**batch)
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    layers = model.lm.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and out.hidden_states[-1].shape[:2] == (b, t)
    assert len(out.attentions) == layers and out.attentions[0].shape[-2:] == (t, t)
    torch.testing.assert_close(out.logits, plain.logits)
    # the last hidden state is what the head reads: through it, the logits
    torch.testing.assert_close(model._head_logits(out.hidden_states[-1]), out.logits, atol=1e-5, rtol=0)
    assert plain.hidden_states is None and plain.attentions is None


def test_return_dict_false_gives_the_outputs_tuple():
    model, processor = tiny_flamingo("llama", gates=0.8)
    batch = processor(["<image>a cat"], images=[[random_image(1)]])
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
        flat = model(**batch, labels=batch["input_ids"], return_dict=False)
    assert isinstance(flat, tuple)
    assert len(flat) == len(out.to_tuple())
    for got, want in zip(flat[:2], (out.loss, out.logits)):  # loss first, then logits, as transformers orders them
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["logits_to_keep", "num_logits_to_keep"])
def test_logits_to_keep_with_labels_is_refused(name):
    model, processor = tiny_flamingo("llama", gates=0.8)
    batch = processor(["<image>a cat"], images=[[random_image(1)]])
    with pytest.raises(ValueError, match=name):
        model(**batch, labels=batch["input_ids"], **{name: 1})
    if name == "logits_to_keep":  # without labels, the LM's own option
        with torch.no_grad():
            assert model(**batch, logits_to_keep=1).logits.shape[1] == 1


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
def test_token_ids_of_other_integer_dtypes_are_refused(dtype):
    model, processor = tiny_flamingo("llama", gates=0.8)
    ids = processor(["a cat"])["input_ids"]
    with pytest.raises(ValueError, match=f"input_ids must hold integer token ids .*got {dtype}"):
        model(ids.to(dtype))
    with torch.no_grad():  # int32 is taken
        torch.testing.assert_close(model(ids.to(torch.int32)).logits, model(ids).logits)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
def test_raw_pixels_are_refused(dtype):
    """uint8 0..255 (or bool) images reached the tower unnormalised (the processor refuses them): another answer."""
    model, processor = tiny_flamingo("llama", gates=0.8)
    batch = processor(["<image>a cat"], images=[[random_image(1)]])
    raw = (batch["images"] * 60 + 128).clamp(0, 255).to(dtype)
    for call in (lambda: model(**{**batch, "images": raw}),
                 lambda: model.generate(**{**batch, "images": raw}, max_new_tokens=1),
                 lambda: model.encode_media(raw)):
        with pytest.raises(ValueError, match=f"images must be pixel values .*got {dtype}"):
            call()


def test_check_token_ids_compares_ids_as_long():
    model, _ = tiny_flamingo("llama", gates=0.8)
    vocab = model.lm.get_input_embeddings().weight.shape[0]
    assert vocab > 256
    model.check_token_ids(torch.tensor([[vocab % 256 + 1]], dtype=torch.uint8))  # in range: no wrapped comparison


def test_pixels_get_a_gradient_through_a_frozen_tower():
    model, processor = tiny_flamingo("llama", gates=0.8)
    assert model.config.freeze_vision
    batch = processor(["<image>a cat"], images=[[random_image(1)]])
    images = batch["images"].clone().requires_grad_(True)
    out = model(**{**batch, "images": images}, labels=batch["input_ids"])
    out.loss.backward()
    assert images.grad is not None and bool(images.grad.abs().sum() > 0)
    assert all(p.grad is None for p in model.vision.parameters())  # the tower's weights stay frozen
