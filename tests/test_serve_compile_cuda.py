"""The server's compiled decode steps on a GPU (`flamingo serve --compile`): inductor with CUDA graphs gives the
eager batch's tokens while rows join and leave, in a bounded number of graphs. Skipped without CUDA (CI has none);
run it on a GPU machine with `pytest tests/test_serve_compile_cuda.py` (bench/device_checks.sh's `tests` part)."""

import pytest
import torch

# the server's test helpers import the `serve` extra: without it this file is skipped, not a collection error
pytest.importorskip("fastapi", reason="the server's test helpers need fastapi (the `serve` extra)")
pytest.importorskip("httpx", reason="the server's test helpers need httpx (the `serve` extra)")

from test_serve_batching import PROMPTS, _run_batch  # noqa: E402

from flamingo.runtime.compat import STATIC_CACHE_MASK_HOOK  # noqa: E402

from serve_helpers import SHARP  # noqa: E402

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(not STATIC_CACHE_MASK_HOOK, reason="compiled decode steps need transformers >= 5.25")]


@pytest.mark.parametrize("lm_kind", ["llama", "mosaic_gpt"])
def test_cuda_graph_steps_equal_eager_steps(make_model, no_tf32, lm_kind):
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


def test_engine_thread_decodes_with_the_graphs_warm_up_compiled(make_model, no_tf32):
    """`flamingo serve --compile` as it runs: warm-up, then jobs submitted from other threads and decoded on the
    engine's thread (torch keeps CUDA graphs per thread; before torch 2.13 a thread other than the first to use them
    failed). Each job gets the eager engine's tokens."""
    from flamingo.serve.engine import Engine
    from flamingo.serve.sampling import SamplingParams

    from serve_helpers import submit_job

    model, processor = make_model("llama", lm_overrides=SHARP["llama"])
    model.cuda()
    tokens = {}
    for backend in (None, "inductor"):
        engine = Engine(model, processor, max_batch=4, compile_backend=backend)
        if backend is not None:
            engine.warm_up()
        engine.start()
        try:
            waits = [submit_job(engine, prompt, media, SamplingParams(max_tokens=8, temperature=0.0))
                     for prompt, media in PROMPTS]
            tokens[backend] = [wait()[0] for wait in waits]
        finally:
            engine.stop(0.0)
    assert tokens["inductor"] == tokens[None]
