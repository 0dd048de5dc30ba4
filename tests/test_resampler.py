"""Perceiver Resampler and video: time embeddings make frame order matter; padded frames are ignored."""

import torch

from flamingo.model.resampler import MLPResampler, PerceiverResampler


def _resampler(cls=PerceiverResampler):
    torch.manual_seed(0)
    if cls is PerceiverResampler:
        return PerceiverResampler(dim=16, depth=2, num_latents=4, heads=2, head_dim=8, ffw_mult=2, max_frames=4)
    return MLPResampler(dim=16, num_latents=4, ffw_mult=2, max_frames=4)


def test_frame_order_matters_through_time_embeddings():
    """Frame f's patches get time embedding f: the resampler equals itself without time embeddings on
    x + time_embeddings[:F]. The perceiver is order-invariant over (F·S) without them, so order changes its output
    by far more than float noise (~1e-7) only through them; the MLP's pooling depends on order by itself, so the
    identity is what pins its time embeddings."""
    for cls in (PerceiverResampler, MLPResampler):
        r = _resampler(cls)
        x = torch.randn(2, 3, 5, 16)  # (M, F, S, D)
        with torch.no_grad():
            out, permuted = r(x), r(x[:, [2, 0, 1]])
            assert out.shape == (2, 4, 16)
            assert (permuted - out).abs().max() > 1e-2, cls.__name__
            time = r.time_embeddings.clone()  # (max_frames, D)
            r.time_embeddings.zero_()
            torch.testing.assert_close(r(x + time[:3, None]), out, atol=1e-5, rtol=1e-5, msg=cls.__name__)
            if cls is PerceiverResampler:
                torch.testing.assert_close(r(x[:, [2, 0, 1]]), r(x))


def test_single_frame_works_and_padded_frames_are_ignored():
    for cls in (PerceiverResampler, MLPResampler):
        r = _resampler(cls)
        x = torch.randn(1, 2, 5, 16)
        padded = torch.cat([x, torch.randn(1, 2, 5, 16)], dim=1)  # 2 real frames + 2 junk frames
        mask = torch.tensor([[True, True, False, False]])
        torch.testing.assert_close(r(padded, mask), r(x), atol=1e-5, rtol=1e-5)
        assert r(x[:, :1]).shape == (1, 4, 16)


def test_video_through_the_model_uses_time_embeddings(make_model):
    from flamingo.tiny import random_image

    model, processor = make_model("llama")
    frames = [random_image(i) for i in range(3)]
    batch = processor("<image>a moving thing", images=[frames])
    assert batch["images"].shape[:3] == (1, 1, 3)
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**processor("<image>a moving thing", images=[frames[::-1]])).logits
        still = model(**processor("<image>a moving thing", images=[frames[0]])).logits
    # reversed frames change the logits by ~1e-2 at gates 0.5, one time embedding for every frame by float noise
    assert (a - b).abs().max() > 1e-3 and (a - still).abs().max() > 1e-3


def test_video_and_still_in_one_batch_equal_alone(make_model):
    from flamingo.tiny import random_image

    model, processor = make_model("llama")
    video = [random_image(i) for i in range(3)]
    prompts, media = ["<image>video<|endofchunk|><image>still", "<image>still only"], [[video, random_image(7)],
                                                                                        [random_image(8)]]
    batch = processor(prompts, images=media)
    assert batch["num_frames"].tolist() == [[3, 1], [1, 0]]
    with torch.no_grad():
        batched = model(**batch).logits
        for i in range(2):
            alone = model(**processor(prompts[i], images=media[i])).logits[0]
            torch.testing.assert_close(batched[i, -alone.shape[0]:], alone, atol=1e-5, rtol=1e-4)
