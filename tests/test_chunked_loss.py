"""The loss from the LM's last hidden states in chunks (`forward(loss_chunks=...)`, `train.loss_chunks`): the same
loss and gradients as from the whole logits on every LM family (added tokens' head rows, untied heads with bias,
padding, packed rows, checkpointing, bf16, quantized backbones), the logits never made whole, LMs that change their
head's output refused the chunks, and the trainer's run unchanged."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from flamingo.build import from_backbones
from flamingo.model.chunked_loss import chunked_cross_entropy, whole_logits_cross_entropy
from flamingo.tiny import (
    LM_KINDS,
    set_gates,
    tiny_flamingo_config,
    tiny_image_processor,
    tiny_tokenizer,
    tiny_vision,
)
from flamingo.train.config import load_config
from flamingo.train.run_log import materialize
from flamingo.train.trainer import Trainer

from helpers import loss_and_grads, training_batch
from train_fixtures import train_config

PROMPT = "Question: what? <image>Short answer: a red circle.<|endofchunk|><image>Short answer: two<|endofchunk|>"


def _batch(processor) -> dict:
    """Two right-padded rows, three images, `<|endofchunk|>` (an added token) among the labels."""
    return training_batch(processor, [PROMPT, "<image>x y z<|endofchunk|>"], [2, 1])


def _assert_same(chunked: tuple, whole: tuple, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    (loss_c, grads_c), (loss_w, grads_w) = chunked, whole
    torch.testing.assert_close(loss_c, loss_w, atol=atol, rtol=1e-6)
    assert grads_c.keys() == grads_w.keys() and grads_w
    for name in grads_w:
        torch.testing.assert_close(grads_c[name], grads_w[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("lm_kind", LM_KINDS)
def test_chunked_loss_equals_the_whole_logits_loss(make_model, lm_kind):
    model, processor = make_model(lm_kind)
    model.train()
    batch = _batch(processor)
    whole = loss_and_grads(model, batch)
    assert model.head_is_last_op()
    for chunks in (1, 3, 1000):  # one chunk, uneven chunks, more chunks than tokens
        _assert_same(loss_and_grads(model, batch, loss_chunks=chunks), whole)
    grads = loss_and_grads(model, batch, loss_chunks=3)[1]
    new_rows = "new_lm_head" if model.new_lm_head is not None else "new_token_embeddings"
    assert grads[new_rows].abs().sum() > 0  # the added tokens' head rows learn through the chunks
    assert model._media_context is None


def test_the_logits_are_never_made_whole(make_model):
    model, processor = make_model("llama")
    model.train()
    batch = _batch(processor)
    tokens = batch["input_ids"].numel()
    assert model.head_is_last_op()  # its probe (one call of the head) made before counting
    rows: list[int] = []
    handle = model.lm.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(out.shape[:-1].numel()))
    out = model(**batch, loss_chunks=4)
    labelled = int(out.loss_tokens)  # on the CPU only those reach the head
    assert out.logits is None and rows[0] == 0 and labelled < tokens  # the LM's own head call gets no token
    assert len(rows) == 5 and max(rows) == math.ceil(labelled / 4)
    out.loss.backward()
    assert len(rows) == 9 and max(rows) == math.ceil(labelled / 4)  # each chunk once more, in backward
    handle.remove()
    with torch.no_grad():  # no gradient: no recompute, the same chunks
        model(**batch, loss_chunks=4)
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape  # without chunks: the logits, as ever


def test_only_labelled_tokens_reach_the_head_and_the_log_softmax(make_model, monkeypatch):
    """Half the labels -100: the chunked loss runs the head, and both losses the log-softmax, on the labelled
    tokens only, with the same loss and gradients as the whole logits of every token."""
    from flamingo.model import chunked_loss

    model, processor = make_model("llama")
    model.train()
    batch = _batch(processor)
    batch["labels"][:, ::2] = -100
    targets = model.loss_targets(batch["labels"], batch["input_ids"], batch["attention_mask"])
    labelled = int((targets != -100).sum())
    assert 0 < labelled < targets.numel() // 2
    assert model.head_is_last_op()  # its probe (one call of the head) made before counting
    head_rows: list[int] = []
    handle = model.lm.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_rows.append(args[0].shape[:-1].numel()))
    softmax_rows: list[int] = []
    cross_entropy = chunked_loss.F.cross_entropy

    def counted(logits, *args, **kwargs):
        softmax_rows.append(logits.shape[0])
        return cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(chunked_loss.F, "cross_entropy", counted)
    whole = loss_and_grads(model, batch)
    assert softmax_rows == [labelled]  # the whole logits' log-softmax: the labelled rows only
    head_rows.clear()
    softmax_rows.clear()
    chunked = loss_and_grads(model, batch, loss_chunks=1)
    handle.remove()
    assert head_rows == [0, labelled, labelled]  # the LM's own call, the chunk, its recompute in backward
    assert softmax_rows == [labelled, labelled]
    _assert_same(chunked, whole)
    with torch.no_grad():  # the mean over the labelled tokens of every token's logits
        logits = model(**{**batch, "labels": None}).logits.flatten(0, 1)
    torch.testing.assert_close(whole[0], cross_entropy(logits, targets.flatten(), ignore_index=-100))


def test_chunked_loss_with_checkpointing_and_bf16(make_model):
    model, processor = make_model("llama")
    model.gradient_checkpointing_enable()
    model.train()
    batch = _batch(processor)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = loss_and_grads(model, batch)
        chunked = loss_and_grads(model, batch, loss_chunks=3)
    # bf16 tolerance: the added tokens' head rows sum their bf16 gradient over each chunk's tokens, then over chunks
    _assert_same(chunked, whole, atol=1e-5, rtol=1.6e-2)


def test_the_probes_leave_activation_checkpointing_on(make_model):
    """A frozen LM is in eval mode with its decoder layers in train mode (HF checkpoints only in training mode): a
    probe that put the whole LM back in eval mode would silently turn checkpointing off."""
    model, processor = make_model("llama")
    model.gradient_checkpointing_enable()
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    assert model.head_is_last_op() and model._lm_packs_exactly()
    assert {name: m.training for name, m in model.named_modules()} == modes
    calls = []
    layer = model.lm.get_submodule(model.decoder_layers_path)[1]
    layer.self_attn.register_forward_hook(lambda m, a, o: calls.append(1))
    batch = _batch(processor)
    model(**batch, loss_chunks=4).loss.backward()
    assert len(calls) == 2  # recomputed in backward


def test_chunked_loss_of_packed_rows(make_model):
    model, processor = make_model("llama")
    model.train()
    batch = _batch(processor)
    ids = torch.cat([batch["input_ids"][0], batch["input_ids"][1]])[None]  # (1, T0 + T1): both samples in a row
    images = torch.cat([batch["images"][0, :2], batch["images"][1, :1]])[None]
    document_ids = torch.cat([torch.zeros(batch["input_ids"].shape[1]), torch.ones(batch["input_ids"].shape[1])])
    packed = dict(input_ids=ids, images=images, num_media=torch.tensor([3]), labels=ids.clone(),
                  document_ids=document_ids.long()[None])
    _assert_same(loss_and_grads(model, packed, loss_chunks=5), loss_and_grads(model, packed))


def test_chunked_loss_on_quantized_backbones(make_model):
    pytest.importorskip("torchao")
    from flamingo.model.quantize import quantize_frozen

    model, processor = make_model("llama")
    quantize_frozen(model, "int8")
    model.train()
    batch = _batch(processor)
    _assert_same(loss_and_grads(model, batch, loss_chunks=4), loss_and_grads(model, batch), atol=1e-5)


def test_no_labelled_token_gives_zero_loss_and_zero_gradient_in_both_paths():
    """A batch without a labelled token (a micro-batch of prompts, a rank's rows cut to their image markers) has
    loss 0 and a zero gradient, chunked or whole: the mean's 0 / 0 was NaN, and its NaN gradient reached the whole
    training step even through a weight of 0."""
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    head = torch.randn(4, 5)
    targets = torch.full((2, 3), -100)
    for loss in (chunked_cross_entropy(hidden, targets, lambda h: h @ head, chunks=2),
                 whole_logits_cross_entropy(hidden @ head, targets)):
        (0.0 * loss).backward()
        assert loss.item() == 0.0 and torch.equal(hidden.grad, torch.zeros_like(hidden))
        hidden.grad = None
    labelled = targets.clone()
    labelled[0, 1] = 3
    expected = F.cross_entropy((hidden @ head).flatten(0, 1), labelled.flatten(), ignore_index=-100)
    assert torch.allclose(chunked_cross_entropy(hidden, labelled, lambda h: h @ head, chunks=2), expected)
    assert torch.allclose(whole_logits_cross_entropy(hidden @ head, labelled), expected)
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        chunked_cross_entropy(hidden, targets, lambda h: h, chunks=0)


@pytest.mark.parametrize("model_type, options", [("gemma2", {"final_logit_softcapping": 30.0}),
                                                 ("cohere", {"logit_scale": 0.5})])
def test_lms_that_change_their_head_output_get_the_whole_logits(model_type, options):
    """Gemma 2 soft-caps its logits after the head, Cohere scales them: the chunks would drop that, so the probe
    refuses them and the loss comes from the LM's own logits."""
    tok = tiny_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=None, **options)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    model, processor = from_backbones(tiny_vision(), lm, tok, tiny_flamingo_config(xattn_every=1),
                                      image_processor=tiny_image_processor())
    set_gates(model, 0.5)
    model.train()
    batch = training_batch(processor, ["<image>a b c d", "<image>x y z"], [1, 1])
    assert not model.head_is_last_op()
    out = model(**batch, loss_chunks=4)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, model.loss(out.logits, batch["labels"], batch["input_ids"],
                                                    batch["attention_mask"]))


def test_trainer_runs_the_same_with_and_without_chunks(world):
    root, vision, lm, data = world

    def run(name: str, chunks: int) -> tuple[list[float], dict[str, torch.Tensor]]:
        path = train_config(root, vision, lm, data, steps=3, out=os.path.join(root, name))
        trainer = Trainer(load_config(path, [f"train.loss_chunks={chunks}"]))
        losses = [materialize(trainer.train_step())["loss"] for _ in range(3)]
        return losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    (whole_losses, whole), (chunked_losses, chunked) = run("whole", 0), run("chunked", 8)
    assert chunked_losses == pytest.approx(whole_losses, rel=1e-6)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="loss_chunks must be >= 0"):
        load_config(train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "bad")),
                    ["train.loss_chunks=-1"])
