"""Each LM family we claim, on tiny random configs (flamingo.tiny): its decoder layers and the blocks' placement are
found, its KV cache gives what the uncached model gives (generation and scoring, gates non-zero), and its support
for packed rows is detected as it is. CI runs this file on both ends of the supported range (docs/compat.md)."""

import pytest
import torch

from flamingo.model.backbones import find_decoder_layers, lm_max_positions, lm_text_config
from flamingo.tiny import LM_KINDS, random_image, tiny_flamingo, tiny_lm

from helpers import continuation_logprobs_reference

FAMILIES = ("llama", "gpt2", "gpt_neox", "opt", "qwen2", "mistral", "phi", "mpt", "mosaic_gpt", "gemma")
LAYERS_PATH = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers",
               "mpt": "transformer.blocks", "mosaic_gpt": "transformer.blocks"}  # the others: model.layers
# OPT builds its attention mask without the position ids, and MPT and MosaicGPT (ALiBi) take none: their packed
# samples would see each other, so `Flamingo` refuses packed rows for them.
PACKS_EXACTLY = {kind: kind not in ("opt", "mpt", "mosaic_gpt") for kind in FAMILIES}
PROMPT = "Intro <image>A photo of<|endofchunk|><image>two"
# where each family's config keeps its position limit (the others: max_position_embeddings); our MosaicGPT's ALiBi
# extrapolates past its max_seq_len, so it has none
POSITION_LIMIT = {"gpt2": "n_positions", "mpt": "max_seq_len", "mosaic_gpt": None}


def test_every_claimed_family_is_a_tiny_kind():
    assert set(FAMILIES) <= set(LM_KINDS)


@pytest.mark.parametrize("kind", FAMILIES)
def test_blocks_are_placed_before_the_chosen_decoder_layers(kind):
    model, processor = tiny_flamingo(kind, xattn_every=2)
    layers = model.lm.get_submodule(find_decoder_layers(model.lm))
    assert find_decoder_layers(model.lm) == LAYERS_PATH.get(kind, "model.layers")
    assert len(layers) == lm_text_config(model.lm).num_hidden_layers == 4
    assert model.xattn_layer_indices == [1, 3] and len(model.xattn) == 2
    seen = []  # which decoder layers receive hidden states the blocks changed
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, kw, i=i: seen.append(i), with_kwargs=True)
    for block in model.xattn:
        block.register_forward_hook(lambda m, a, out: seen.append("block"))
    with torch.no_grad():
        model(**processor(PROMPT, images=[random_image(0), random_image(1)]))
    assert seen == [0, "block", 1, 2, "block", 3]  # a block runs in the pre-hook of layers 1 and 3


def _uncached_greedy(model, batch, steps: int) -> list[int]:
    ids, media = batch["input_ids"], {k: batch[k] for k in ("images", "num_media") if k in batch}
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, **media).logits[0, -1]
        logits[model.config.media_token_id] = -float("inf")
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("kind", FAMILIES)
def test_cache_gives_what_the_uncached_model_gives(kind):
    model, processor = tiny_flamingo(kind, gates=0.5)
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    assert out[0, batch["input_ids"].shape[1]:].tolist() == _uncached_greedy(model, batch, 6)

    candidates = [[40, 41, 42], [43], [44, 45]]  # scoring: each candidate on a copy of the context's cache rows
    media = {"images": batch["images"], "num_media": batch["num_media"]}
    scores = model.score(batch["input_ids"], candidates, **media)
    expected = [continuation_logprobs_reference(model, batch["input_ids"], c, **media) for c in candidates]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", FAMILIES)
def test_added_tokens_enter_the_lm_as_its_own_table_gives_them(kind):
    """At gate 0 a prompt holding an added token (`<|endofchunk|>`) gives the bare LM's logits: the added rows the
    model keeps enter the LM as its own embedding gives them, scaled as it scales its table (Gemma: x sqrt(hidden)).
    The other gate-0 checks use prompts without an added token."""
    model, processor = tiny_flamingo(kind, gates=0.0)
    batch = processor("A cat.<|endofchunk|>A dog")
    assert (batch["input_ids"] == model.config.end_of_chunk_token_id).any()
    with torch.no_grad():
        ours = model(**batch).logits
        # outside a Flamingo call the hooks leave the LM bare
        bare = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, bare, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", FAMILIES)
def test_packed_sequence_support_is_detected_as_it_is(kind):
    model, _ = tiny_flamingo(kind)
    ids = torch.arange(20, 31)[None]  # (1, 11): two runs, 6 + 5 tokens, positions restarting at the second
    with torch.no_grad():
        alone = model.lm(input_ids=ids[:, 6:]).logits
        kwargs = {"position_ids": torch.cat([torch.arange(6), torch.arange(5)])[None]} \
            if model._lm_takes_position_ids else {}
        packed = model.lm(input_ids=ids, use_cache=False, **kwargs).logits[:, 6:]
    really = bool((packed - alone).abs().max() <= 1e-4)
    assert model._lm_packs_exactly() == really == PACKS_EXACTLY[kind]


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_familys_position_limit_is_read_under_its_own_name(kind):
    """MPT names its limit `max_seq_len` (transformers maps no `max_position_embeddings` to it): it was not read, so
    MPT backbones had no position limit and a long prompt failed inside transformers' ALiBi bias."""
    name = POSITION_LIMIT.get(kind, "max_position_embeddings")
    lm = tiny_lm(kind, **{name or "max_seq_len": 40})
    assert lm_max_positions(lm) == (40 if name else None)
