"""Equal to transformers' IDEFICS: `from_idefics` gives the logits and greedy tokens of `IdeficsForVisionText2Text`.

Tiny random `IdeficsConfig`s built here (no download): hidden 32, 4 layers, cross-layer interval 2, a 2-layer
CLIP-shaped tower, a 2-layer perceiver, every norm weight and alpha random (at IDEFICS's init they are ones and
zeros, which would hide a dropped part). The peer's image attention mask comes from transformers' own IDEFICS
processing functions.
"""

import copy

import pytest
import torch
from transformers import IdeficsConfig, IdeficsForVisionText2Text
from transformers.models.idefics.processing_idefics import (
    IdeficsProcessor,
    image_attention_mask_for_packed_input_ids,
    incremental_to_binary_attention_mask,
)

from flamingo.convert import from_idefics
from flamingo.convert.idefics import idefics_image_processor
from flamingo.processing import FlamingoProcessor
from flamingo.runtime.compat import TRANSFORMERS, dtype_kwargs, pil_image_processor
from flamingo.tiny import random_image, tiny_tokenizer

FAKE = "<fake_token_around_image>"
PROMPTS = [  # 3 images with text before the first, 1 image, 0 images: left padding, every media-index case
    "Intro words here. <image>Question: what? Short answer: red.<image><image>Question: and this?",
    "<image>A photo of a cat.",
    "Only text, no image at all in this one.",
]
NUM_IMAGES = [3, 1, 0]
IdeficsImageProcessorPil = pil_image_processor("IdeficsImageProcessor")


def _tokenizer():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [FAKE, "<image>"]})
    tok.pad_token = tok.eos_token
    return tok


def _peer(alpha_type: str, qk_norms: bool, seed: int = 0):
    tok = _tokenizer()
    config = IdeficsConfig(
        vocab_size=len(tok) - 2, additional_vocab_size=2, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=qk_norms, alpha_type=alpha_type,
        use_resampler=True, pad_token_id=0,
        bos_token_id=0, eos_token_id=0, max_position_embeddings=128,
        vision_config=dict(embed_dim=32, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=8, resampler_depth=2, resampler_n_heads=4,
                              resampler_head_dim=8, qk_layer_norms_perceiver=qk_norms))
    torch.manual_seed(seed)
    peer = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if "norm" in name or name.endswith(("ln.weight", "ln.bias")):
                p.add_(0.3 * torch.randn_like(p))
        for layer in peer.model.gated_cross_attn_layers:  # open gates: random signs, |alpha| in [0.3, 1]
            for alpha in (layer.alpha_cross_attn, layer.alpha_dense):
                alpha.copy_(torch.empty_like(alpha).uniform_(0.3, 1.0) * torch.randn_like(alpha).sign())
    return peer, tok


def save_peer(directory, alpha_type: str, qk_norms: bool):
    """`_peer` saved as `save_pretrained` writes an IDEFICS directory (model and tokenizer) -> `directory`."""
    peer, tok = _peer(alpha_type, qk_norms)
    peer.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _inputs(processor):
    media = [[random_image(i) for i in range(n)] for n in NUM_IMAGES]
    return processor(PROMPTS, images=media)


def _peer_inputs(batch, tok):
    """IDEFICS's own inputs for our batch: pixel values (B, N, C, H, W), its image attention mask (B, T, N)."""
    ids = batch["input_ids"]
    n = max(1, batch["images"].shape[1])
    incremental, _ = image_attention_mask_for_packed_input_ids(ids.clone(), tok, "pt")
    mask = incremental_to_binary_attention_mask(incremental, "pt", num_classes=n)
    return dict(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["images"][:, :, 0],
                image_attention_mask=mask)


def _max_diff(ours, peer, batch, tok) -> float:
    with torch.no_grad():
        mine = ours(**batch).logits
        theirs = peer(**_peer_inputs(batch, tok)).logits
    real = batch["attention_mask"].bool()
    return float((mine[real] - theirs[real]).abs().max())


@pytest.mark.parametrize("alpha_type,qk_norms", [("float", False), ("vector", True)])
def test_logits_equal_idefics(alpha_type, qk_norms):
    peer, tok = _peer(alpha_type, qk_norms)
    ours, processor = from_idefics(copy.deepcopy(peer), copy.deepcopy(tok))
    assert ours.xattn_layer_indices == [0, 2]  # IDEFICS's placement: idx % cross_layer_interval == 0
    batch = _inputs(processor)
    assert batch["num_media"].tolist() == NUM_IMAGES and batch["attention_mask"][2, 0] == 0  # left-padded
    assert _max_diff(ours, peer, batch, tok) <= 1e-5
    # Not vacuous: the images matter.
    other = {**batch, "images": torch.randn_like(batch["images"])}
    with torch.no_grad():
        assert not torch.allclose(ours(**other).logits, ours(**batch).logits)


def test_a_dropped_vector_gate_or_qk_norm_fails_the_equality():
    """What a converter that dropped the vector alphas or the q/k norms would compute is far from IDEFICS."""
    peer, tok = _peer("vector", True)
    ours, processor = from_idefics(copy.deepcopy(peer), copy.deepcopy(tok))
    batch = _inputs(processor)
    assert _max_diff(ours, peer, batch, tok) <= 1e-5
    scalar = copy.deepcopy(ours)
    with torch.no_grad():  # a float alpha read from a vector one: its mean
        for block in scalar.xattn:
            block.attn_gate.fill_(float(block.attn_gate.mean()))
            block.ffw_gate.fill_(float(block.ffw_gate.mean()))
    assert _max_diff(scalar, peer, batch, tok) > 1e-3
    for part in ("attn", "resampler"):
        dropped = copy.deepcopy(ours)
        modules = [b.attn for b in dropped.xattn] if part == "attn" else [x["attn"] for x in dropped.resampler.layers]
        for module in modules:
            module.q_norm = module.k_norm = None
        assert _max_diff(dropped, peer, batch, tok) > 1e-3, part
    extra = copy.deepcopy(peer)  # a tensor the converter has no place for is an error, never dropped silently
    extra.model.gated_cross_attn_layers[1].register_buffer("beta", torch.ones(1))
    with pytest.raises(ValueError, match="no place for"):
        from_idefics(extra, copy.deepcopy(tok))


def test_greedy_generation_equal_idefics():
    peer, tok = _peer("vector", True, seed=1)
    ours, processor = from_idefics(copy.deepcopy(peer), copy.deepcopy(tok))
    batch = _inputs(processor)
    image_id = ours.config.media_token_id
    mine = ours.generate(**batch, max_new_tokens=8, min_new_tokens=8)
    with torch.no_grad():
        theirs = peer.generate(**_peer_inputs(batch, tok), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                               suppress_tokens=[image_id], pad_token_id=0)
    assert mine.shape == theirs.shape and torch.equal(mine, theirs)


def test_a_bf16_conversion_keeps_the_rotary_frequencies_float32_as_idefics_does(tmp_path):
    """IDEFICS's `from_pretrained(dtype=bf16)` keeps its rotary `inv_freq` float32; the conversion in bf16 too
    (rounded, 1/10 became 0.10009765625)."""
    save_peer(tmp_path, "vector", True)
    peer = IdeficsForVisionText2Text.from_pretrained(tmp_path, **dtype_kwargs(torch.bfloat16))
    theirs = peer.model.layers[0].self_attn.rotary_emb.inv_freq
    ours, _ = from_idefics(str(tmp_path), torch_dtype=torch.bfloat16)
    assert ours.lm.get_input_embeddings().weight.dtype == torch.bfloat16
    rotary = {name: b for name, b in ours.lm.named_buffers() if name.endswith("inv_freq")}
    assert "model.rotary_emb.inv_freq" in rotary  # (transformers 5 keeps an `original_inv_freq` beside it)
    assert set(rotary) <= {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    for b in rotary.values():
        assert b.dtype == theirs.dtype == torch.float32 and torch.equal(b, theirs)


def test_vision_tower_and_image_processing_equal():
    peer, tok = _peer("float", False)
    ours, processor = from_idefics(copy.deepcopy(peer), copy.deepcopy(tok))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.vision(pixel_values=pixels).last_hidden_state,
                              peer.model.vision_model(pixel_values=pixels).last_hidden_state, atol=1e-5)
    image = random_image(7, size=48)
    theirs = IdeficsImageProcessorPil(image_size=32)(images=[image], return_tensors="pt")
    theirs = theirs if isinstance(theirs, torch.Tensor) else theirs["pixel_values"]  # (1, C, H, W)
    mine = idefics_image_processor(32)(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.allclose(mine, theirs, atol=1e-6)


@pytest.mark.skipif(TRANSFORMERS < (5, 0), reason="transformers 4's IdeficsProcessor (the peer) takes only a "
                    "LlamaTokenizerFast, and the tiny tokenizer is a PreTrainedTokenizerFast")
def test_an_idefics_prompt_works_unchanged():
    """The `idefics` template: IDEFICS's processor and ours give the same ids, whether the user writes IDEFICS's
    wrapped form or a plain `<image>` prompt."""
    peer, tok = _peer("float", False)
    ours, processor = from_idefics(copy.deepcopy(peer), copy.deepcopy(tok))
    images = [random_image(1), random_image(2)]
    theirs = IdeficsProcessor(IdeficsImageProcessorPil(image_size=32), copy.deepcopy(tok))(
        text=[["User:", images[0], images[1], "Describe these.\nAssistant:"]], return_tensors="pt")
    wrapped = f"User:{FAKE}<image>{FAKE}<image>{FAKE}Describe these.\nAssistant:"
    for prompt in (wrapped, "User:<image><image>Describe these.\nAssistant:"):
        mine = processor(prompt, images=images)
        assert mine["input_ids"].tolist() == theirs["input_ids"].tolist(), prompt
        assert torch.allclose(mine["images"][:, :, 0], theirs["pixel_values"], atol=1e-6)
    # an interleaved list as IDEFICS's processor reads one: the spaces at its text items' edges stripped
    spaced = ["User: what is", images[0], " and", images[1], " ?\nAssistant:"]
    theirs = IdeficsProcessor(IdeficsImageProcessorPil(image_size=32), copy.deepcopy(tok))(
        text=[spaced], return_tensors="pt")
    assert processor(spaced)["input_ids"].tolist() == theirs["input_ids"].tolist()


@pytest.mark.skipif(TRANSFORMERS < (5, 0), reason="transformers 4's IdeficsProcessor (the peer) takes only a "
                    "LlamaTokenizerFast, and the tiny tokenizer is a PreTrainedTokenizerFast")
def test_an_empty_text_item_between_images_keeps_them_apart_as_idefics_does():
    """An interleaved list with a text item that strips to nothing between two images: IDEFICS's processor writes
    each image in its own `<fake_token_around_image>`s (the empty item counts as text), and so does the template,
    from the list and from the string IDEFICS writes for it."""
    tok = _tokenizer()
    processor = FlamingoProcessor(copy.deepcopy(tok), idefics_image_processor(32), template="idefics")
    peer = IdeficsProcessor(IdeficsImageProcessorPil(image_size=32), copy.deepcopy(tok))
    images = [random_image(1), random_image(2)]
    for prompt in (["User:", images[0], " ", images[1], "x"], ["User:", images[0], "", images[1], "x"],
                   ["User:", images[0], images[1], " x"]):
        theirs = peer(text=[prompt], return_tensors="pt")["input_ids"].tolist()
        assert processor(prompt)["input_ids"].tolist() == theirs, tok.decode(theirs[0])
    written = f"User:{FAKE}<image>{FAKE}{FAKE}<image>{FAKE}x"
    assert processor(written, images=images)["input_ids"].tolist() == \
        peer(text=[["User:", images[0], "", images[1], "x"]], return_tensors="pt")["input_ids"].tolist()


@pytest.mark.slow
def test_convert_idefics_command_round_trip(tmp_path):
    from flamingo import load_pretrained
    from flamingo.cli import main

    peer, tok = _peer("vector", True, seed=2)
    peer.save_pretrained(tmp_path / "idefics")
    tok.save_pretrained(tmp_path / "idefics")
    IdeficsImageProcessorPil(image_size=32).save_pretrained(tmp_path / "idefics")
    assert main(["convert", "idefics", "--model", str(tmp_path / "idefics"), "--out", str(tmp_path / "out")]) == 0
    ours, processor = load_pretrained(str(tmp_path / "out"))
    batch = _inputs(processor)
    assert _max_diff(ours, peer, batch, tok) <= 1e-5
    ids = ours.generate(**batch, max_new_tokens=3, min_new_tokens=3)  # generation accepts it as any other model
    assert ids.shape == (3, batch["input_ids"].shape[1] + 3)
    # so does the server's decode loop: prefill in chunks, then batched steps, the greedy tokens of `generate`
    from flamingo.model.batching import DecodeBatch
    from flamingo.model.prefill import Prefill
    from flamingo.model.prefix_cache import PrefixCache

    one = processor(PROMPTS[0], images=[random_image(i) for i in range(NUM_IMAGES[0])])  # text, then 3 images
    expected = ours.generate(**one, max_new_tokens=4, min_new_tokens=4)[0, one["input_ids"].shape[1]:].tolist()
    cache = PrefixCache(2**24, block=4)
    for again in (False, True):  # the second time from the prefix cache: all but the prompt's last block reused
        prefill = Prefill(ours, one["input_ids"][0], one["images"], one["num_media"], one["num_frames"], chunk=5,
                          prefix_cache=cache)
        row = None
        while row is None:
            row = prefill.step()
        assert (row.cached_tokens > 0) == again
        decode = DecodeBatch(ours, max_rows=2)
        decode.add(row)
        tokens = [int(row.logits.argmax())]
        with torch.no_grad():
            while len(tokens) < 4:
                tokens.append(int(decode.step(torch.tensor([tokens[-1]])).argmax(-1)))
        assert tokens == expected
    args = ["convert", "idefics", "--model", str(tmp_path / "idefics"), "--out", str(tmp_path / "small"),
            "--trained-only", "--backbones", str(tmp_path / "backbones")]
    assert main(args) == 0 and not (tmp_path / "small" / "lm").exists()
    small, _ = load_pretrained(str(tmp_path / "small"))
    assert _max_diff(small, peer, batch, tok) <= 1e-5
    assert main(["convert", "idefics", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_bench_idefics_decodes_the_same_tokens_as_idefics():
    """bench/idefics.py's set-up: ours and transformers' IDEFICS on the same weights generate the same tokens."""
    import argparse

    from bench.idefics import run

    args = argparse.Namespace(shape="tiny", images=[3], batch=[2], new_tokens=4, device="cpu", dtype="fp32",
                              repeats=1)
    (row,) = run(args)
    assert row["same_tokens"] and row["ours_decode_tok_s"] > 0 and row["idefics_decode_tok_s"] > 0
