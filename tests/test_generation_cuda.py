"""Generation on a GPU: the decode step compiled with inductor and captured in CUDA graphs gives the eager tokens
with one graph for prompts of different lengths and image counts, a prompt prefilled in chunks decodes like one
prefill, and batched scoring equals each context alone. Skipped without CUDA (CI has none); run it on a GPU machine
with `pytest tests/test_generation_cuda.py`."""

import pytest
import torch

from flamingo.tiny import random_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SHOTS = "<image>Question: what? Short answer: red<|endofchunk|>"
PROMPTS = [(SHOTS * 2 + "<image>Question: what is this? Short answer:", [random_image(i) for i in range(3)]),
           ("<image>Question: what is this? Short answer:", [random_image(7)])]


def _on_cuda(batch):
    return {k: v.cuda() for k, v in batch.items() if isinstance(v, torch.Tensor)}


def test_cuda_graph_decoding_equals_eager_with_one_graph(make_model, no_tf32):
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, processor = make_model("llama")
    model.cuda()
    torch._dynamo.reset()
    counters.clear()
    for prompt, media in PROMPTS:
        batch = _on_cuda(processor(prompt, images=media))
        eager = model.generate(**batch, max_new_tokens=8, min_new_tokens=8)
        compiled = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, compile=True)
        assert compiled.tolist() == eager.tolist()
    assert counters["stats"]["unique_graphs"] == 1


def test_cuda_chunked_prefill_and_batched_scoring(make_model, no_tf32):
    model, processor = make_model("llama")
    model.cuda()
    prompt, media = PROMPTS[0]
    batch = _on_cuda(processor(prompt, images=media))
    whole = model.generate(**batch, max_new_tokens=8, min_new_tokens=8)
    chunked = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, prefill_chunk_size=5)
    assert chunked.tolist() == whole.tolist()
    prompts = [p for p, _ in PROMPTS]
    both = _on_cuda(processor(prompts, images=[m for _, m in PROMPTS], padding_side="left"))
    candidates = [[[5, 6, 7], [8]], [[9, 10], [11, 12, 13], [14]]]
    together = model.score_batch(both["input_ids"], candidates, attention_mask=both["attention_mask"],
                                 images=both["images"], num_media=both["num_media"], num_frames=both["num_frames"])
    for i, (p, m) in enumerate(PROMPTS):
        alone = _on_cuda(processor(p, images=m))
        expected = model.score(alone["input_ids"], candidates[i], images=alone["images"])
        torch.testing.assert_close(together[i], expected, atol=1e-4, rtol=1e-4)
