"""Frozen backbones stored in bf16 beside float32 trained parts (`train.frozen_dtype: bf16` with `train.precision:
bf16`): each LM family trains under CPU autocast, the LM's layers get the activations in their own dtype, and in
float32 nothing changes."""

import pytest
import torch

from flamingo.model.quantize import cast_frozen
from flamingo.tiny import LM_KINDS, tiny_lm, tiny_tokenizer
from flamingo.train.config import load_config
from flamingo.train.trainer import Trainer

from helpers import training_batch
from train_fixtures import train_config

TEXTS = ["<image>a red square.<|endofchunk|>", "<image>a blue one<|endofchunk|>"]


def bf16_loss(model, batch: dict) -> torch.Tensor:
    """Forward and backward as a `precision: bf16` training step on the CPU runs them."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, loss_chunks=8).loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("lm_kind", LM_KINDS)
def test_bf16_frozen_backbones_train_under_cpu_autocast(make_model, one_thread, lm_kind):
    """The blocks' output is float32 (float32 gates); a bf16 LayerNorm (GPT-2, OPT, MosaicGPT, ...) needs it back in
    bf16 on the CPU, where autocast leaves `layer_norm` in the input's dtype. The gates get gradients."""
    model, processor = make_model(lm_kind)
    cast_frozen(model, torch.bfloat16)
    model.train()
    loss = bf16_loss(model, training_batch(processor, TEXTS, [1, 1]))
    assert torch.isfinite(loss)
    for name, p in model.trainable_parameters().items():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
    for block in model.xattn:
        assert block.attn_gate.grad.abs().sum() > 0 and block.ffw_gate.grad.abs().sum() > 0


@pytest.mark.parametrize("lm_kind", ["llama", "gpt2"])
def test_the_lm_layer_gets_the_block_output_itself_in_float32(make_model, lm_kind):
    """In float32 the cast back to the LM's dtype is a no-op: the next layer receives the block's output tensor."""
    model, processor = make_model(lm_kind)
    block_out, layer_in = [], []
    j, i = 0, model.xattn_layer_indices[0]
    model.xattn[j].register_forward_hook(lambda m, a, out: block_out.append(out))
    layer = model.lm.get_submodule(model.decoder_layers_path)[i]
    # registered after ours: sees what ours hands the layer
    layer.register_forward_pre_hook(
        lambda m, a, kw: layer_in.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**training_batch(processor, TEXTS, [1, 1]))
    assert len(block_out) == len(layer_in) == 1 and layer_in[0] is block_out[0]


def test_bf16_frozen_llama_stays_close_to_float32(make_model, one_thread):
    """An RMSNorm LM (it casts its norms' input itself): with bf16 activations between its layers, its bf16 loss and
    gate gradients stay within bf16 rounding of the float32 ones."""
    ref, processor = make_model("llama")
    ref.train()
    batch = training_batch(processor, TEXTS, [1, 1])
    ref_loss = ref(**batch, loss_chunks=8).loss
    ref_loss.backward()
    model, _ = make_model("llama")
    cast_frozen(model, torch.bfloat16)
    model.train()
    loss = bf16_loss(model, batch)
    assert abs(float(loss) - float(ref_loss)) < 5e-3
    for ours, theirs in zip(model.xattn, ref.xattn):
        torch.testing.assert_close(ours.attn_gate.grad, theirs.attn_gate.grad, atol=1e-3, rtol=0.1)
        torch.testing.assert_close(ours.ffw_gate.grad, theirs.ffw_gate.grad, atol=1e-3, rtol=0.1)


def test_trainer_steps_with_bf16_frozen_gpt2(world, tmp_path):
    """configs/example.yaml's `precision: bf16` + `frozen_dtype: bf16` on a LayerNorm LM, through the trainer."""
    root, vision, _, data = world
    lm_dir = str(tmp_path / "lm_gpt2")
    tok = tiny_tokenizer()
    tiny_lm("gpt2", vocab_size=len(tok)).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    out = str(tmp_path / "run")
    bf16 = dict(precision="bf16", frozen_dtype="bf16", progress=False, save_every=0)
    trainer = Trainer(load_config(train_config(root, vision, lm_dir, data, steps=2, out=out, **bf16)))
    assert next(trainer.model.lm.parameters()).dtype == torch.bfloat16
    gates = [b.attn_gate.detach().clone() for b in trainer.model.xattn]
    for _ in range(2):
        trainer.train_step()
    assert all(not torch.equal(b.attn_gate, g) for b, g in zip(trainer.model.xattn, gates))


@pytest.mark.parametrize("block", ["flamingo", "idefics"])
def test_float32_blocks_beside_a_bf16_lm_run_outside_autocast(make_model, one_thread, block):
    """In-memory bf16 backbones given to `from_backbones` (transformers 5 loads a Hub LM in its config's dtype), or a
    model trained with `train.frozen_dtype: bf16`, keep float32 blocks beside the bf16 LM: every call outside autocast
    died in torch's Linear (the paper's block). The block now computes in its own dtype: with gates 0 it is exactly
    the bare bf16 LM, and generate, score and precomputed visual tokens of another dtype run."""
    from flamingo import from_backbones
    from flamingo.tiny import random_image, set_gates, tiny_flamingo_config, tiny_image_processor, tiny_vision

    tok = tiny_tokenizer()
    config = tiny_flamingo_config(block=block, **({"xattn_ffw_dim": 64} if block == "idefics" else {}))
    model, processor = from_backbones(tiny_vision().to(torch.bfloat16),
                                      tiny_lm("llama", vocab_size=len(tok)).to(torch.bfloat16), tok, config,
                                      image_processor=tiny_image_processor())
    model.eval()
    assert next(model.xattn.parameters()).dtype == torch.float32 and next(model.lm.parameters()).dtype == torch.bfloat16
    text = processor("Only text here", images=[])
    with torch.no_grad():  # gates 0: the bare LM, bit for bit
        assert torch.equal(model(**text).logits, model.lm(input_ids=text["input_ids"]).logits)
    set_gates(model, 0.5)
    batch = processor("<image>A photo of", images=[random_image(0)])
    with torch.no_grad():
        logits = model(**batch).logits
        visual = model.encode_media(batch["images"], torch.tensor([1]))
        again = model(input_ids=batch["input_ids"], visual_tokens=visual.to(torch.float64)).logits
    assert torch.isfinite(logits).all() and torch.equal(again, logits)
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    scores = model.score(batch["input_ids"], [[5, 6]], images=batch["images"])
    assert torch.isfinite(torch.as_tensor(scores)).all()
