"""Candidate scoring under the last-image rule: each candidate row gathers only its context's last image's K/V,
(C, 1, R, h, d) per block, never every image's (C, N, R, h, d), and scores as a plain forward of context+candidate."""

import pytest
import torch

from flamingo.model.context import MediaContext, Phase
from flamingo.tiny import random_image

from helpers import continuation_logprobs_reference

SHOT = "<image>Question: what? Short answer: red<|endofchunk|>"
CONTEXTS = [  # (prompt, images): many images, one, none
    (SHOT * 4 + "<image>Question: what is this? Short answer:", [random_image(i) for i in range(5)]),
    ("<image>Question: what is this? Short answer:", [random_image(7)]),
    ("Question: what is this? Short answer:", []),
]
CANDIDATES = [[[50, 60, 70, 80, 90, 100], [80], [11, 12, 13]], [[90, 100, 110, 120]], [[7, 8, 9, 10, 11], [12]]]


@pytest.fixture
def no_all_images_copy_in_score(monkeypatch):
    """Fails a SCORE call that asks `kv_for` for every image's K/V per candidate row; records the K/V shapes the
    candidates gathered instead."""
    kv_for, last = MediaContext.kv_for, MediaContext.candidates_last_image_kv
    shapes = []

    def guarded(self, *args, **kwargs):
        assert self.phase is not Phase.SCORE, "a SCORE call copied every image's K/V per candidate"
        return kv_for(self, *args, **kwargs)

    def recorded(self, *args, **kwargs):
        kv = last(self, *args, **kwargs)
        shapes.append(tuple(kv.k.shape))
        return kv

    monkeypatch.setattr(MediaContext, "kv_for", guarded)
    monkeypatch.setattr(MediaContext, "candidates_last_image_kv", recorded)
    return shapes


@pytest.mark.parametrize("overrides", [{}, {"imageless_rows_skip_blocks": True}])
def test_candidates_of_many_image_contexts_score_as_a_forward_of_context_and_candidate(
    make_model, no_all_images_copy_in_score, overrides
):
    model, processor = make_model("llama", **overrides)
    batch = processor([p for p, _ in CONTEXTS], images=[m for _, m in CONTEXTS], padding_side="left")
    for rows in (64, 2):  # one chunk, and chunks that split a context's candidates
        no_all_images_copy_in_score.clear()
        with torch.no_grad():
            scores = model.score_batch(
                batch["input_ids"],
                CANDIDATES,
                attention_mask=batch["attention_mask"],
                images=batch["images"],
                num_media=batch["num_media"],
                num_frames=batch["num_frames"],
                batch_size=rows,
            )
        assert no_all_images_copy_in_score and all(s[1] == 1 for s in no_all_images_copy_in_score)
        for (prompt, media), cands, got in zip(CONTEXTS, CANDIDATES, scores):
            alone = processor(prompt, images=media)
            extra = {k: alone[k] for k in ("images", "num_media", "num_frames") if alone.get(k) is not None}
            with torch.no_grad():
                expected = [continuation_logprobs_reference(model, alone["input_ids"], c, **extra) for c in cands]
            torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-5)


def test_models_that_see_every_image_keep_every_image_for_candidates(make_model):
    """Without the last-image rule a candidate token attends to all its context's images: scores still equal a
    forward of context+candidate (the all-images path)."""
    model, processor = make_model("llama", only_attend_last_image=False)
    prompt, media = CONTEXTS[0]
    batch = processor(prompt, images=media)
    extra = {k: batch[k] for k in ("images", "num_media", "num_frames") if batch.get(k) is not None}
    with torch.no_grad():
        scores = model.score(batch["input_ids"], CANDIDATES[0], **extra)
        expected = [continuation_logprobs_reference(model, batch["input_ids"], c, **extra) for c in CANDIDATES[0]]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-4, rtol=1e-5)
