"""FSDP2 hooks the outputs of each sharded module's forward (and of `project_media`) so that backward all-gathers its
parameters again; an output that is a view loses that hook to any in-place op, and torch warns at every such output.
Our modules (the blocks' visual K/V, the model's visual tokens) return tensors of their own."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from flamingo.tiny import tiny_flamingo
from flamingo.train.parallel import apply_fsdp

from helpers import training_batch


@pytest.mark.parametrize(
    "block", [{}, {"block": "idefics", "xattn_ffw_dim": 64, "xattn_qk_norm": True}], ids=["flamingo", "idefics"]
)
def test_fsdp_modules_return_no_views_and_the_gradients_hold(tmp_path, one_thread, block):
    """The blocks' K and V were head-split chunks of one projection, and the visual tokens an unflattened
    index_copy: FSDP2 warned "returned a view tensor" for FSDPGatedCrossAttentionBlock and FSDPFlamingo (one gloo
    process, as a sharded run's rank). No warning now, and the sharded gradients are the unsharded model's."""
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/rendezvous")
    try:
        plain, processor = tiny_flamingo("llama", **block)
        sharded, _ = tiny_flamingo("llama", **block)  # the same weights (seeded)
        batch = training_batch(processor, ["<image>a red square<|endofchunk|>", "<image>x y z"], [1, 1])
        plain.train()
        plain(**batch).loss.backward()
        sharded.train()
        apply_fsdp(sharded)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sharded(**batch).loss.backward()
        views = [str(w.message)[:80] for w in caught if "returned a view tensor" in str(w.message)]
        assert not views, views
        grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
        assert any("to_kv" in n for n in grads)
        for name, p in sharded.named_parameters():
            if name in grads:
                assert torch.allclose(p.grad.full_tensor(), grads[name], atol=1e-6), name
    finally:
        dist.destroy_process_group()
