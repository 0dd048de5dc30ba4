"""The server's compiled decode steps on a GPU (`flamingo serve --compile`): inductor with CUDA graphs gives the
eager batch's tokens while rows join and leave, in a bounded number of graphs. Skipped without CUDA (CI has none);
run it on a GPU machine with `pytest tests/test_serve_compile_cuda.py` (bench/device_checks.sh's `tests` part)."""

import pytest
import torch
from test_serve_batching import PROMPTS, _run_batch

from flamingo.runtime.compat import STATIC_CACHE_MASK_HOOK

from serve_helpers import SHARP

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(not STATIC_CACHE_MASK_HOOK, reason="compiled decode steps need transformers >= 5.25")]


@pytest.mark.parametrize("lm_kind", ["llama", "mosaic_gpt"])
def test_cuda_graph_steps_equal_eager_steps(make_model, lm_kind):
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, processor = make_model(lm_kind, lm_overrides=SHARP[lm_kind])
    model.cuda()
    torch._dynamo.reset()
    counters.clear()
    cases = PROMPTS * 2
    eager = _run_batch(model, processor, cases, steps=12, chunk=7, max_rows=4)
    compiled = _run_batch(model, processor, cases, steps=12, chunk=7, max_rows=4, compile_backend="inductor")
    assert compiled == eager
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] <= 16, dict(counters["stats"])  # rows 1-4 x windows x media
