"""`train.compile`: the compiled regions compute the eager step's losses and gradients, compile a handful of graphs
(not one per layer or per batch), and the padding buckets that keep shapes few are exact."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch._dynamo

from flamingo.train.buckets import pad_to_buckets, round_up
from flamingo.train.compile import compile_regions
from flamingo.train.config import load_config
from flamingo.train.run_log import materialize
from flamingo.train.trainer import Trainer

from helpers import loss_and_grads, training_batch
from train_fixtures import save_backbones, train_config, write_datasets


def test_padding_buckets_are_exact(make_model):
    """Text padded on the right (mask 0, labels -100) and empty media slots left out by num_media: the same loss and
    the same gradients for every trained parameter."""
    model, processor = make_model(gates=0.5)
    model.train()
    batch = training_batch(processor, ["<image>a red square.<|endofchunk|><image>a blue one", "<image>green."], [2, 1])
    padded = pad_to_buckets(batch, tokens_multiple=16, media_multiple=4,
                            pad_token_id=processor.tokenizer.pad_token_id)
    t, n = batch["input_ids"].shape[1], batch["images"].shape[1]
    assert padded["input_ids"].shape[1] == round_up(t, 16) > t and padded["images"].shape[1] == 4 > n
    assert padded["num_media"].tolist() == batch["num_media"].tolist()
    loss, grads = loss_and_grads(model, batch)
    loss_p, grads_p = loss_and_grads(model, padded)
    torch.testing.assert_close(loss_p, loss, atol=1e-6, rtol=1e-6)
    assert set(grads_p) == set(grads)
    for name in grads:
        torch.testing.assert_close(grads_p[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_padding_marks_packed_rows_padding_and_counts_media_when_none_was_given():
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 5, dtype=torch.long),
             "document_ids": torch.tensor([[0, 0, 1, 1, -1], [0, 0, 0, 0, 0]]),
             "images": torch.ones(2, 3, 1, 3, 4, 4)}
    out = pad_to_buckets(batch, tokens_multiple=8, media_multiple=2, pad_token_id=7)
    assert out["input_ids"][:, 5:].eq(7).all() and out["labels"][:, 5:].eq(-100).all()
    assert out["document_ids"][:, 5:].eq(-1).all() and out["attention_mask"][:, 5:].eq(0).all()
    assert out["attention_mask"][:, :5].eq(1).all()
    assert out["num_media"].tolist() == [3, 3] and out["images"].shape[1] == 4 and out["images"][:, 3].eq(0).all()


def test_a_bucket_never_pads_past_the_lms_positions(world, make_model):
    """Padded columns take positions too: buckets of 64 tokens on an LM of 44 positions padded a 15-token batch to 64
    and the first step was refused ("the batch is padded to 64 columns"), though every row fitted. A bucket stops at
    the positions; a batch already wider is left as it is."""
    batch = {"input_ids": torch.ones(2, 40, dtype=torch.long)}
    assert pad_to_buckets(batch, tokens_multiple=64, media_multiple=1, pad_token_id=0,
                          max_tokens=44)["input_ids"].shape[1] == 44
    assert pad_to_buckets(batch, tokens_multiple=8, media_multiple=1, pad_token_id=0,
                          max_tokens=44)["input_ids"].shape[1] == 40
    assert pad_to_buckets({"input_ids": torch.ones(2, 50, dtype=torch.long)}, tokens_multiple=64, media_multiple=1,
                          pad_token_id=0, max_tokens=44)["input_ids"].shape[1] == 50
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "bucket"), interleaved=False,
                        pad_tokens_multiple=64)
    model, processor = make_model("gpt2", lm_overrides={"n_positions": 44})
    trainer = Trainer(load_config(path), model=model, processor=processor)
    assert trainer.positions == 44
    assert torch.isfinite(torch.as_tensor(trainer.train_step()["loss"]))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("lm_kind", ["llama", "mosaic_gpt"])  # mosaic_gpt: our own LM class's layers compile too
def test_compiled_regions_equal_eager_losses_and_gradients(make_model, lm_kind):
    """Three batches of different lengths and image counts: the compiled model's losses and gradients equal the eager
    model's (fp32 tolerance); the decoder layers share their graphs (no recompile per layer) and a change of shape
    compiles at most once more (automatic dynamic shapes). Traced by `aot_eager` (the graphs inductor would get,
    forward and backward, without generating C++ kernels: minutes on 2 cores); the trainer test below runs inductor."""
    eager, processor = make_model(lm_kind, gates=0.5)
    eager.train()
    compiled = copy.deepcopy(eager)
    regions = compile_regions(compiled, backend="aot_eager")
    assert any(r.startswith("lm.") for r in regions) and "resampler" in regions
    prompts = [(["<image>a red square.<|endofchunk|><image>a blue one", "<image>green."], [2, 1]),
               (["<image>one.<|endofchunk|><image>two", "<image>x<|endofchunk|><image>y"], [2, 2]),
               (["<image>a<|endofchunk|><image>b<|endofchunk|><image>a long caption here", "<image>z"], [3, 1])]
    batches = [training_batch(processor, texts, counts, seed) for seed, (texts, counts) in enumerate(prompts)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for batch in batches:  # the dense masked cross-attention, as the trainer runs it compiled on a CPU
        loss, grads = loss_and_grads(eager, batch, xattn_impl="reference")
        loss_c, grads_c = loss_and_grads(compiled, batch, xattn_impl="reference")
        torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
        assert set(grads_c) == set(grads)
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not torch._dynamo.utils.counters["graph_break"]  # each region is whole graphs (the resampler read its
    # frame mask, a break, until the model passed None for all-real media)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    layers = len(compiled.lm.get_submodule(compiled.decoder_layers_path))
    # 4 region classes (decoder layer, vision layer, xattn block, resampler), each compiled for the first shapes and
    # at most twice more as sizes change: far fewer than one graph per layer and batch
    assert 4 <= graphs <= 12 < layers * len(batches) + 4


def test_compiled_resampler_keeps_a_frame_mask_without_breaking_its_graph(make_model):
    """Videos with padded frames: the compiled resampler applies the mask inside its graph, an all-real one too,
    without reading it (the same tokens as eager)."""
    model, _ = make_model()
    resampler = model.resampler.train()
    compiled = copy.deepcopy(resampler)
    compiled.compile(backend="aot_eager")
    features = torch.randn(3, 2, 5, resampler.latents.shape[-1])  # (M, F, S, D)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for mask in (torch.tensor([[True, True], [True, False], [True, True]]), torch.ones(3, 2, dtype=torch.bool), None):
        torch.testing.assert_close(compiled(features, mask), resampler(features, mask), atol=1e-5, rtol=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trainer_compiled_steps_equal_eager_steps(tmp_path):
    """`train.compile: true` (with its default 8-token buckets) trains the same losses as the eager trainer."""
    root = str(tmp_path)
    vision, lm = save_backbones(root)
    data = write_datasets(os.path.join(root, "data"), n_pairs=16, n_docs=8)
    losses = {}
    for compiled in (False, True):
        config = load_config(train_config(root, vision, lm, data, steps=2, out=os.path.join(root, f"run-{compiled}"),
                                          interleaved=False, compile=compiled, progress=False))
        trainer = Trainer(config)
        assert trainer.pad_tokens_multiple == (8 if compiled else 1)
        losses[compiled] = [materialize(trainer.train_step())["loss"] for _ in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)


def test_compile_with_activation_checkpointing_is_refused_clearly(make_model):
    model, _ = make_model()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="activation checkpointing"):
        compile_regions(model)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("variant", ["lora", "int8"])
def test_compiled_regions_with_lora_or_quantized_frozen_weights_equal_eager(make_model, variant):
    """The memory modes under compile: LoRA adapters in the compiled decoder layers, int8 frozen linears (aot_eager)."""
    extra = {"lm_lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}} if variant == "lora" else {}
    eager, processor = make_model(gates=0.5, **extra)
    if variant == "int8":
        pytest.importorskip("torchao")
        from flamingo.model.quantize import quantize_frozen

        quantize_frozen(eager, "int8")
    eager.train()
    compiled = copy.deepcopy(eager)
    compile_regions(compiled, backend="aot_eager")
    batch = training_batch(processor, ["<image>a red square.<|endofchunk|><image>a blue one", "<image>green."], [2, 1])
    loss, grads = loss_and_grads(eager, batch, xattn_impl="reference")
    loss_c, grads_c = loss_and_grads(compiled, batch, xattn_impl="reference")
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
    assert set(grads_c) == set(grads) and any("lora" in n for n in grads) == (variant == "lora")
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_config_refuses_compile_with_gradient_checkpointing_and_negative_buckets():
    with pytest.raises(ValueError, match="cannot be combined"):
        load_config("configs/example.yaml", ["train.compile=true", "train.gradient_checkpointing=true"])
    with pytest.raises(ValueError, match="pad_tokens_multiple"):
        load_config("configs/example.yaml", ["train.pad_tokens_multiple=-1"])
    assert load_config("configs/example.yaml", ["train.compile=true"]).train.compile is True
