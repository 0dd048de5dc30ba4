"""A resampler and blocks in different dtypes (cast apart by hand): the visual tokens enter the blocks in the
blocks' dtype, as the tower's features enter the resampler in its own and the LM's hidden states each block in its
own: forward, generate and score run (they failed in torch's matmul, naming no module)."""

import copy

import pytest
import torch

from flamingo.tiny import random_image, tiny_flamingo

PROMPT = "<image>Question: what is this? Short answer: red<|endofchunk|><image>Question: and this?"


@pytest.mark.parametrize("resampler, blocks", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                               (torch.float32, torch.bfloat16)])
def test_resampler_and_blocks_in_other_dtypes(resampler, blocks):
    model, processor = tiny_flamingo("llama", gates=0.9)
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    apart = copy.deepcopy(model)
    apart.resampler.to(resampler)
    apart.xattn.to(blocks)
    with torch.no_grad():
        logits = apart(**batch).logits
        assert torch.isfinite(logits).all()
        visual = apart.encode_media(batch["images"], batch["num_media"])
        assert visual.dtype == blocks == apart.visual_dtype
        assert apart.as_visual_tokens(visual.float()).dtype == blocks
        by_tokens = apart(batch["input_ids"], attention_mask=batch["attention_mask"], visual_tokens=visual).logits
        torch.testing.assert_close(by_tokens, logits)
    out = apart.generate(**batch, max_new_tokens=4, min_new_tokens=4)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4
    scores = apart.score(batch["input_ids"], [[5, 6], [7]], images=batch["images"])
    assert torch.isfinite(scores).all()
