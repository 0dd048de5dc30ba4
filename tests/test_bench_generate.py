"""bench/generate.py's divergence report: where greedy tokens of ours and the peer first differ, and whether the two
picks are a near tie under the models' numerical disagreement."""

import torch

from bench.common import build_pair
from bench.generate import QUERY, SHOT, divergence


def test_divergence_finds_the_first_differing_step_and_scores_both_picks():
    pair = build_pair("tiny")
    torch.manual_seed(0)
    ids = torch.tensor([pair.processor.tokenizer(SHOT * 2 + QUERY)["input_ids"]] * 2)  # (2, T)
    mask = torch.ones_like(ids)
    images = torch.randn(2, 3, 1, 3, pair.image_size, pair.image_size)  # a different image set per row
    pad = pair.processor.tokenizer.pad_token_id
    with torch.inference_mode():
        ours_new = pair.ours.generate(ids, mask, images, max_new_tokens=4, min_new_tokens=4)[:, ids.shape[1]:]
        peer_new = pair.peer.generate(vision_x=images, lang_x=ids, attention_mask=mask, max_new_tokens=4,
                                      min_new_tokens=4, num_beams=1, do_sample=False,
                                      pad_token_id=pad)[:, ids.shape[1]:]
        assert torch.equal(ours_new, peer_new)  # same weights, fp32
        assert divergence(pair, ids, mask, images, ours_new, peer_new) == {"first_divergence_step": None}

        # a peer that picked, at step 2 of row 1, the token ours finds least likely there
        prefix = torch.cat([ids[1:], ours_new[1:, :2]], dim=1)
        logits = pair.ours(input_ids=prefix, attention_mask=torch.ones_like(prefix), images=images[1:]).logits[0, -1]
        other = peer_new.clone()
        other[1, 2] = int(logits.argmin())
        report = divergence(pair, ids, mask, images, ours_new, other)
    assert report["first_divergence_step"] == 2 and report["divergence_row"] == 1
    assert int(logits.argmax()) == int(ours_new[1, 2])
    assert abs(report["ours_logit_gap"] - float(logits.max() - logits.min())) < 1e-4
    assert report["max_logit_diff"] < 1e-4  # the two models agree to float32 rounding
    assert report["near_tie"] is False  # a real difference, far beyond that


def test_v1_and_mmgpt_peers_decode_the_same_tokens_as_ours():
    """`--peer v1` / `--peer mmgpt` at the tiny shape: the peer's own generate (forced tokens handed to its LM's) and
    ours (for mmgpt with the LM's adapters kept and merged) give the same greedy tokens, and every timed column is
    there."""
    import argparse
    import importlib.util

    import pytest

    from flamingo.peers.openflamingo import openflamingo_v1_dir

    if not (openflamingo_v1_dir() / "open_flamingo" / "src" / "flamingo_lm.py").is_file():
        pytest.skip("OpenFlamingo v1 is not installed")
    from bench.generate import run

    peers = ["v1"] + (["mmgpt"] if importlib.util.find_spec("mmgpt") and importlib.util.find_spec("peft") else [])
    for peer in peers:
        pair = build_pair("tiny", peer=peer)
        args = argparse.Namespace(dtype="fp32", shots=[2], batch=[2], new_tokens=3, device="cpu", cache="dynamic",
                                  compile=False, skip_peer=False, xattn_impl=["auto"], repeats=1, shape="tiny",
                                  xattn_every=1, lm="llama")
        (row,) = run(args, pair)
        assert row["same_tokens_as_peer"], (peer, row)
        assert row[f"decode_vs_{peer}"] > 0 and row[f"{peer}_decode_tok_s"] > 0
        if peer == "mmgpt":
            assert row["ours_merged_same_tokens_as_peer"] and row["ours_merged_decode_tok_s"] > 0
