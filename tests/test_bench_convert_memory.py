"""bench/convert_memory.py at the tiny shape: each IDEFICS conversion runs in its own process, by the library's path
and by the old one (random init, then a copy), and reports its peak and held memory over the weights and its time."""

import argparse

import pytest

from bench.convert_memory import run


@pytest.mark.slow
def test_the_convert_memory_bench_runs_both_paths_in_subprocesses():
    args = argparse.Namespace(shape="tiny", kinds=["idefics", "openflamingo"], checkpoint_dtype="bf16", dtype=None,
                              repeats=1)
    rows = {(row["kind"], row["path"]): row for row in run(args)}
    assert set(rows) == {(kind, path) for kind in ("idefics", "openflamingo") for path in ("old", "new")}
    for (kind, _), row in rows.items():
        assert row["checkpoint_mib"] > 0 and row["seconds"] > 0
        assert row["peak_over_weights"] >= row["held_over_weights"] > 0
        assert row["model_over_weights"] == pytest.approx(rows[kind, "old"]["model_over_weights"])
