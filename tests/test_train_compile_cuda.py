"""`train.compile` on a GPU: the compiled regions (inductor, the xattn blocks running FlexAttention with the hook's
block mask as an input) give the eager model's loss and gradients, over batch shapes that change. Skipped without
CUDA (CI has none); run it on a GPU machine with `pytest tests/test_train_compile_cuda.py`."""

from __future__ import annotations

import copy

import pytest
import torch

from flamingo.model.xattn import flex_available
from flamingo.train.compile import compile_regions

from helpers import loss_and_grads, training_batch

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and flex_available(torch.device("cuda"))),
                                reason="needs CUDA and FlexAttention")


def test_compiled_regions_with_flex_equal_eager_on_cuda(make_model, no_tf32):
    eager, processor = make_model(gates=0.5)
    eager.cuda().train()
    compiled = copy.deepcopy(eager)
    compile_regions(compiled)
    texts = [(["<image>a red square.<|endofchunk|><image>a blue one", "<image>green."], [2, 1]),
             (["<image>a<|endofchunk|><image>b<|endofchunk|><image>a long caption here", "<image>z"], [3, 1])]
    for seed, (prompts, counts) in enumerate(texts):
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) and k not in ("num_media", "num_frames") else v
                 for k, v in training_batch(processor, prompts, counts, seed).items()}
        loss, grads = loss_and_grads(eager, batch, xattn_impl="flex")
        loss_c, grads_c = loss_and_grads(compiled, batch)  # "auto": FlexAttention with gradients on a GPU
        torch.testing.assert_close(loss_c, loss, atol=1e-4, rtol=1e-4)
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], atol=1e-4, rtol=1e-3, msg=name)
