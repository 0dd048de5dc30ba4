"""bench/otter.py at the tiny shape: ours and Otter's model on the same converted weights, timed side by side; our
greedy tokens are Otter's uncached ones (its cached `generate` drops the image for generated tokens)."""

import argparse

import pytest

pytestmark = pytest.mark.peer
pytest.importorskip("otter_ai.models.otter.modeling_otter", reason="otter-ai is not installed")
from bench.otter import run  # noqa: E402


def test_the_otter_bench_runs_and_compares_the_same_tokens(one_thread):
    args = argparse.Namespace(shape="tiny", images=[2], batch=[1], new_tokens=3, device="cpu", dtype="fp32",
                              repeats=1)
    (row,) = run(args)
    assert row["same_tokens_uncached"] is True
    assert all(row[f"{name}_decode_tok_s"] > 0 for name in ("ours", "otter", "otter_nocache"))
    assert row["decode_vs_otter"] == row["ours_decode_tok_s"] / row["otter_decode_tok_s"]
