"""The masking rule at module level: exact zeros before the first image, only the own image matters, and every
implementation (reference, segments, gather) computes the same function."""

import pytest
import torch

from flamingo.model.xattn import (
    GatedCrossAttentionBlock,
    MediaKV,
    compute_media_index,
    flex_block_mask,
    masked_cross_attention,
)

MEDIA = 7


def _inputs(seed: int = 0, b: int = 3, t: int = 40, n: int = 4, r: int = 5, h: int = 2, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 20, (b, t), generator=g)
    # Sample 0: images at 5, 6 (adjacent), 30; sample 1: none; sample 2: image at 0 and 39 (last token).
    ids[0, [5, 6, 30]] = MEDIA
    ids[2, [0, 39]] = MEDIA
    q = torch.randn(b, t, h, d, generator=g)
    kv = MediaKV(torch.randn(b, n, r, h, d, generator=g), torch.randn(b, n, r, h, d, generator=g))
    return ids, q, kv


def test_media_index_counts_images_at_or_before_each_token():
    ids = torch.tensor([[1, MEDIA, 2, 3, MEDIA, 4], [MEDIA, 1, 1, 1, 1, 1]])
    assert compute_media_index(ids, MEDIA).tolist() == [[0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1]]
    # Decoding continues from the images seen in earlier calls.
    assert compute_media_index(torch.tensor([[1], [2]]), MEDIA, torch.tensor([2, 1])).tolist() == [[2], [1]]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("impl", ["segments", "gather", "flex"])
def test_fast_paths_equal_reference(impl):
    ids, q, kv = _inputs()
    index = compute_media_index(ids, MEDIA)
    ref = masked_cross_attention(q, kv, index, impl="reference")
    out = masked_cross_attention(q, kv, index, impl=impl)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    if impl == "flex":  # the all-previous-images rule too, with a block mask made beforehand (as the hooks do)
        mask = flex_block_mask(index, kv.k.shape[1], kv.k.shape[2], only_last=False)
        a = masked_cross_attention(q, kv, index, only_attend_last_image=False, impl="flex", block_mask=mask)
        torch.testing.assert_close(a, masked_cross_attention(q, kv, index, only_attend_last_image=False,
                                                             impl="reference"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_paths_agree_with_sharp_scores(dtype):
    """|q·k| above fp16's range before the 1/sqrt(d) scale (scaled scores well inside it): "gather" multiplied in
    half precision first, so fp16 gave inf - inf = NaN and bf16 rounded the unscaled scores, where SDPA scales first."""
    ids, q, kv = _inputs(seed=4, d=64)
    q, kv = q * 60, MediaKV(kv.k * 60, kv.v)  # |q·k| up to ~1e5: scaled, ~1e4
    index = compute_media_index(ids, MEDIA)
    half = q.to(dtype), MediaKV(kv.k.to(dtype), kv.v.to(dtype))
    exact = masked_cross_attention(half[0].double(), MediaKV(half[1].k.double(), half[1].v.double()), index,
                                   impl="reference")  # of the same rounded inputs
    for impl in ("reference", "segments", "gather"):
        out = masked_cross_attention(*half, index, impl=impl).double()
        assert torch.isfinite(out).all(), impl
        torch.testing.assert_close(out, exact, atol=0.1, rtol=0.05, msg=impl)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_one_image_per_row_reference_equals_the_other_paths_and_builds_no_mask(monkeypatch):
    """N=1 (pairs, decode steps): "reference" runs SDPA unmasked (an all-true mask is no rule and rules out flash
    on CUDA); rows before the image and a row without one stay exactly zero, and every path agrees."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 20, (3, 12), generator=g)
    ids[0, 4], ids[2, 0] = MEDIA, MEDIA  # row 0: index 0 before token 4; row 1: no image; row 2: image at 0
    index = compute_media_index(ids, MEDIA)
    q = torch.randn(3, 12, 2, 8, generator=g)
    kv = MediaKV(torch.randn(3, 1, 5, 2, 8, generator=g), torch.randn(3, 1, 5, 2, 8, generator=g))
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, **kw: masks.append(attn_mask) or sdpa(*a, attn_mask=attn_mask, **kw))
    ref = masked_cross_attention(q, kv, index, impl="reference")
    assert masks == [None]
    assert torch.equal(ref[0, :4], torch.zeros_like(ref[0, :4])) and torch.equal(ref[1], torch.zeros_like(ref[1]))
    assert ref[0, 4:].abs().sum(-1).min() > 0 and ref[2].abs().sum(-1).min() > 0
    assert torch.equal(masked_cross_attention(q, kv, index, only_attend_last_image=False, impl="reference"), ref)
    for impl in ("segments", "gather", "flex"):
        torch.testing.assert_close(masked_cross_attention(q, kv, index, impl=impl), ref, atol=1e-6, rtol=1e-5)


def test_segments_handle_long_and_uneven_runs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 20, (2, 300), generator=g)
    ids[0, [3, 4, 5, 200]] = MEDIA  # runs of 1, 1, 195, 100 tokens
    ids[1, [299]] = MEDIA
    q = torch.randn(2, 300, 2, 4, generator=g)
    kv = MediaKV(torch.randn(2, 4, 3, 2, 4, generator=g), torch.randn(2, 4, 3, 2, 4, generator=g))
    index = compute_media_index(ids, MEDIA)
    torch.testing.assert_close(masked_cross_attention(q, kv, index, impl="segments"),
                               masked_cross_attention(q, kv, index, impl="reference"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "segments", "gather"])
def test_text_before_first_image_gets_exactly_zero(impl):
    ids, q, kv = _inputs()
    index = compute_media_index(ids, MEDIA)
    out = masked_cross_attention(q, kv, index, impl=impl)
    assert torch.equal(out[0, :5], torch.zeros_like(out[0, :5]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # a sample without images
    assert out[0, 5:].abs().sum(-1).min() > 0


@pytest.mark.parametrize("impl", ["reference", "segments", "gather"])
def test_token_output_depends_only_on_its_own_image(impl):
    ids, q, kv = _inputs()
    index = compute_media_index(ids, MEDIA)
    base = masked_cross_attention(q, kv, index, impl=impl)
    for image in range(kv.k.shape[1]):  # perturb one image's keys and values at a time
        k2, v2 = kv.k.clone(), kv.v.clone()
        k2[:, image] += 3.0
        v2[:, image] -= 2.0
        out = masked_cross_attention(q, MediaKV(k2, v2), index, impl=impl)
        sees = index == image + 1  # (B, T)
        assert torch.equal(out[~sees], base[~sees])
        if sees.any():
            assert not torch.allclose(out[sees], base[sees])


def test_attend_all_previous_images_mode():
    ids, q, kv = _inputs()
    index = compute_media_index(ids, MEDIA)
    out = masked_cross_attention(q, kv, index, only_attend_last_image=False)
    assert torch.equal(out[0, :5], torch.zeros_like(out[0, :5]))
    # Token 35 of sample 0 sees images 1..3; changing image 1 changes it, changing image 4 (unseen) does not.
    k2 = kv.k.clone()
    k2[0, 0] += 3.0
    assert not torch.allclose(masked_cross_attention(q, MediaKV(k2, kv.v), index, only_attend_last_image=False)[0, 35],
                              out[0, 35])
    k3 = kv.k.clone()
    k3[0, 3] += 3.0
    assert torch.equal(masked_cross_attention(q, MediaKV(k3, kv.v), index, only_attend_last_image=False), out)
    with pytest.raises(ValueError):
        masked_cross_attention(q, kv, index, only_attend_last_image=False, impl="segments")


def test_gated_block_is_identity_at_init_and_ffw_applies_to_all_tokens():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=16, dim_visual=12, heads=2, head_dim=4, ffw_mult=2)
    x = torch.randn(2, 9, 16)
    visual = torch.randn(2, 3, 5, 12)
    ids = torch.randint(10, 20, (2, 9))
    ids[0, 4] = MEDIA
    index = compute_media_index(ids, MEDIA)
    kv = block.project_media(visual)
    assert torch.equal(block(x, kv, index), x)  # gates are 0
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
    out = block(x, kv, index)
    assert torch.equal(out[0, :4], x[0, :4]) and torch.equal(out[1], x[1])  # no image yet: attention term is 0
    assert not torch.allclose(out[0, 4:], x[0, 4:])
    # Without media the block equals its FFW-only path, which is what text before an image gets.
    with torch.no_grad():
        block.ffw_gate.fill_(1.0)
    torch.testing.assert_close(block(x, None, None)[0, :4], block(x, kv, index)[0, :4])


def test_next_image_index():
    """v1's rule on `x <image> a b <image> c` (2 images): x and a, b see the next image, each `<image>` its own,
    c (after the last image) none; with the whole row's image count given, a chunk's last text sees a later image."""
    from flamingo.model.xattn import compute_media_index, next_image_index

    media = 9
    ids = torch.tensor([[5, media, 6, 7, media, 8]])
    count = compute_media_index(ids, media)
    assert next_image_index(count, ids == media).tolist() == [[1, 1, 2, 2, 2, 0]]
    first_chunk = ids[:, :4]
    assert next_image_index(compute_media_index(first_chunk, media), first_chunk == media,
                            torch.tensor([2])).tolist() == [[1, 1, 2, 2]]
