"""The Flamingo model on tiny random HF backbones: identity at gate 0, per-image masking through the whole LM,
trainable parameters, gradients, architectures, no leftover state, padding."""

import copy

import pytest
import torch

from flamingo.runtime.compat import lm_cache_argument
from flamingo.tiny import LM_KINDS, random_image, tiny_lm, tiny_tokenizer

from helpers import loss_and_grads, training_batch

PROMPT = "Question: what? <image>Short answer: a red circle.<|endofchunk|><image>Short answer: two<|endofchunk|>"


@pytest.mark.parametrize("lm_kind", LM_KINDS)
def test_gate_zero_equals_bare_lm_and_ignores_images(make_model, lm_kind):
    model, processor = make_model(lm_kind, gates=0.0)
    bare = tiny_lm(lm_kind, vocab_size=len(tiny_tokenizer()))  # same seed: same weights as the model's LM
    text = processor("Question: what is in the image? Short answer: a red circle.")
    with torch.no_grad():
        ours = model(**text).logits
        ref = bare(input_ids=text["input_ids"]).logits
    assert (ours[..., : ref.shape[-1]] - ref).abs().max() <= 1e-5

    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    other = processor(PROMPT, images=[random_image(2), random_image(3)])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**other).logits)


@pytest.mark.parametrize("lm_kind", LM_KINDS)
def test_added_tokens_read_the_rows_the_lm_would_give_them(make_model, lm_kind):
    """At init the added tokens' trainable rows are the LM's own rows for them: with gates 0, a prompt full of
    `<image>` and `<|endofchunk|>` gives the bare LM's logits, also where the LM's embedding scales its output
    (Gemma's scaled word embedding in transformers 5)."""
    model, processor = make_model(lm_kind, gates=0.0)
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    with torch.no_grad():
        ours = model(**batch).logits
        bare = model.lm(input_ids=batch["input_ids"]).logits  # outside a Flamingo call: no hook runs
    assert (ours - bare).abs().max() <= 1e-5


@pytest.mark.parametrize("lm_kind,vision_kind", [("llama", "clip"), ("gpt2", "siglip"), ("gpt_neox", "clip"),
                                                 ("opt", "siglip"), ("qwen2", "clip"), ("phi", "siglip")])
def test_changing_image_k_leaves_tokens_before_it_unchanged(make_model, lm_kind, vision_kind):
    model, processor = make_model(lm_kind, vision_kind)
    images = [random_image(i) for i in range(3)]
    prompt = "Intro text <image>first<|endofchunk|><image>second one<|endofchunk|><image>third"
    batch = processor(prompt, images=images)
    ids = batch["input_ids"][0]
    positions = (ids == processor.media_token_id).nonzero().flatten().tolist()
    with torch.no_grad():
        base = model(**batch).logits[0]
        for k in range(3):
            changed = list(images)
            changed[k] = random_image(100 + k)
            logits = model(**processor(prompt, images=changed)).logits[0]
            assert torch.equal(logits[: positions[k]], base[: positions[k]]), f"image {k} leaked backwards"
            assert not torch.allclose(logits[positions[k]:], base[positions[k]:])


def test_only_last_image_is_seen_by_xattn_but_lm_carries_earlier_images_forward(make_model):
    """Through the LM's self-attention later tokens do depend on earlier images; with xattn_every=4 (one block
    before the last layer) and a zero FFW gate, the block's own output depends only on the last image."""
    model, processor = make_model("llama", xattn_every=4)
    images = [random_image(i) for i in range(2)]
    prompt = "<image>first<|endofchunk|><image>second"
    seen = {}
    handle = model.lm.get_submodule(model.decoder_layers_path)[3].register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("h", (a[0] if a else kw["hidden_states"]).detach().clone()),
        with_kwargs=True)
    with torch.no_grad():
        out_a = model(**processor(prompt, images=images)).logits
        h_a = seen["h"]
        out_b = model(**processor(prompt, images=[random_image(9), images[1]])).logits
        h_b = seen["h"]
    handle.remove()
    assert not torch.equal(out_a, out_b)  # the LM carries information from image 1 forward
    assert not torch.equal(h_a, h_b)


def test_text_without_images_equals_prefix_before_first_image(make_model):
    model, processor = make_model("llama")
    full = processor("Some text before <image>after", images=[random_image(0)])
    prefix_len = int((full["input_ids"][0] == processor.media_token_id).nonzero()[0])
    text_only = {"input_ids": full["input_ids"][:, :prefix_len]}
    with torch.no_grad():
        a = model(**full).logits[:, :prefix_len]
        b = model(**text_only).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_exact_trainable_parameters_and_zero_grad_for_frozen(make_model):
    model, processor = make_model("llama")
    trainable = set(model.trainable_parameters())
    expected = {n for n, _ in model.named_parameters() if n.startswith(("resampler.", "xattn."))}
    expected |= {"new_token_embeddings", "new_lm_head"}
    assert trainable == expected
    assert model.new_token_embeddings.shape[0] == 3  # <|endofchunk|>, <image>, <PAD>
    assert all(not p.requires_grad for p in model.lm.parameters())
    assert all(not p.requires_grad for p in model.vision.parameters())

    model.train()
    assert not model.lm.training and not model.vision.training  # frozen backbones stay deterministic
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(p.grad is None for p in model.vision.parameters())
    for name in ("new_token_embeddings", "new_lm_head"):
        assert getattr(model, name).grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if name.startswith("xattn.") or name.startswith("resampler.layers"):
            assert p.grad is not None, name


def test_gradient_mask_mode_old_rows_zero_when_lm_unfrozen(make_model):
    """freeze_lm=False (the paper's ablation): the LM trains; our added-token rows shadow its own rows, whose
    gradient is zero, so the old vocabulary rows are unchanged in meaning and only the new rows learn for new ids."""
    model, processor = make_model("llama", freeze_lm=False)
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    model(**batch, labels=batch["input_ids"]).loss.backward()
    emb = model.lm.get_input_embeddings().weight
    first = model.config.first_new_token_id
    assert torch.equal(emb.grad[first:], torch.zeros_like(emb.grad[first:]))
    assert emb.grad[:first].abs().sum() > 0


def test_loss_ignores_image_and_pad_positions(make_model):
    model, processor = make_model("llama")
    batch = processor([PROMPT, "short <image>x"], images=[[random_image(0), random_image(1)], [random_image(2)]],
                      padding_side="right")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
        logits = out.logits[:, :-1].float()
        labels = batch["input_ids"][:, 1:].clone()
        labels[(labels == processor.media_token_id) | (batch["attention_mask"][:, 1:] == 0)] = -100
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_no_conditioning_state_left_after_call_even_on_error(make_model):
    model, processor = make_model("llama")

    def tensors() -> dict:  # plain tensor attributes (not parameters or buffers), e.g. a rotary table the LM keeps
        return {(name, k): v for name, module in model.named_modules() for k, v in vars(module).items()
                if not k.startswith("_") and isinstance(v, torch.Tensor)}

    before = tensors()
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    model(**batch)
    assert model._media_context is None
    state = {k: v for k, v in vars(model).items() if not k.startswith("_modules")}

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    handle = model.lm.get_submodule(model.decoder_layers_path)[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        model(**batch)
    handle.remove()
    assert model._media_context is None
    assert {k: v for k, v in vars(model).items() if not k.startswith("_modules")}.keys() == state.keys()
    after = tensors()  # no module keeps tensors from a call
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())


@pytest.mark.parametrize("lm_kind", ["llama", "gpt2"])
def test_hooked_lm_outside_a_flamingo_call_is_the_bare_lm(make_model, lm_kind):
    """model.lm called directly (no Flamingo call around it) computes exactly the frozen LM it was built from: no
    block runs (not even the gated FFW), and the added tokens use the LM's own rows."""
    model, processor = make_model(lm_kind)
    bare = copy.deepcopy(model.lm)
    for module in [bare, *bare.modules()]:  # the copy without Flamingo's hooks
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    ids = processor(PROMPT, images=[random_image(0), random_image(1)])["input_ids"]  # includes the added tokens
    with torch.no_grad():
        hooked, plain = model.lm(input_ids=ids).logits, bare(input_ids=ids).logits
        flamingo = model(ids, images=processor(PROMPT, images=[random_image(0), random_image(1)])["images"]).logits
    assert torch.equal(hooked, plain)
    assert not torch.allclose(flamingo, plain)  # the gates are open: inside a call the blocks do run


def test_left_padded_batch_equals_one_by_one(make_model):
    model, processor = make_model("llama")
    prompts = [PROMPT, "<image>short", "no images at all here"]
    media = [[random_image(0), random_image(1)], [random_image(2)], []]
    batch = processor(prompts, images=media, padding_side="left")
    with torch.no_grad():
        batched = model(**batch).logits
        for i, (p, m) in enumerate(zip(prompts, media)):
            alone = model(**processor(p, images=m)).logits[0]
            n = alone.shape[0]
            torch.testing.assert_close(batched[i, -n:], alone, atol=1e-5, rtol=1e-4)


def test_media_count_mismatch_is_a_clear_error(make_model):
    model, processor = make_model("llama")
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    with pytest.raises(ValueError, match="<image> token"):
        model(input_ids=batch["input_ids"])  # images missing
    with pytest.raises(ValueError, match="<image> token"):
        model(**{**batch, "num_media": torch.tensor([1])})


def test_empty_prompt_is_a_clear_error_in_every_entry_point(make_model):
    """A prompt of no tokens (`processor("")` on a tokenizer without BOS) failed inside the embedding hook."""
    model, processor = make_model("llama")
    empty = processor("")
    assert empty["input_ids"].shape == (1, 0)
    for call in (lambda: model(**empty), lambda: model.generate(**empty, max_new_tokens=2),
                 lambda: model.score_batch(empty["input_ids"], [[[5]]], attention_mask=empty["attention_mask"])):
        with pytest.raises(ValueError, match="no tokens"):
            call()


def test_media_for_another_batch_size_is_a_clear_error(make_model):
    """images / num_media / visual_tokens with another number of rows than input_ids failed inside torch."""
    model, processor = make_model("llama")
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    two = batch["input_ids"].repeat(2, 1)  # (2, T)
    with pytest.raises(ValueError, match="input_ids has 2 row"):
        model(input_ids=two, images=batch["images"])
    with pytest.raises(ValueError, match="input_ids has 2 row"):
        model(input_ids=two, images=batch["images"], num_media=torch.tensor([2]))
    with pytest.raises(ValueError, match="input_ids has 1 row"):
        model(**{**batch, "num_media": torch.tensor([2, 2])})
    visual = model(**batch).visual_tokens
    with pytest.raises(ValueError, match="input_ids has 2 row"):
        model.generate(input_ids=two, visual_tokens=visual, num_media=torch.tensor([2]), max_new_tokens=2)


def test_malformed_tensors_are_clear_errors_in_every_entry_point(make_model):
    """Per-token tensors of another shape, float or out-of-vocabulary ids, pixels in another channel layout and
    frame counts beyond the frames given failed inside torch (or, for a continuation id of -2, scored another
    token)."""
    model, processor = make_model("llama")
    batch = processor([PROMPT, PROMPT], images=[[random_image(0), random_image(1)], [random_image(2), random_image(3)]])
    vocab = model.lm.get_input_embeddings().weight.shape[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    oov = ids.clone()
    oov[1, -1] = vocab
    cases = [
        (dict(attention_mask=mask[:, 1:]), "attention_mask must have input_ids' shape"),
        (dict(input_ids=oov), f"token id {vocab}, outside the LM's vocabulary"),
        (dict(input_ids=ids.float()), "integer token ids"),
        (dict(images=batch["images"][..., :1, :, :]), "1 channel"),
        (dict(images=batch["images"].movedim(3, -1)), "channel"),  # (..., H, W, C)
        (dict(num_frames=torch.full((2, 2), 2)), "num_frames holds 2 but images have 1 frame"),
        (dict(num_frames=torch.ones(2, dtype=torch.long)), "num_frames must be"),
        (dict(num_media=torch.tensor([3, 2])), r"num_media must be in \[0, 2\]"),
    ]
    for change, message in cases:
        inputs = {**batch, **change}
        with pytest.raises(ValueError, match=message):
            model(**inputs)
        with pytest.raises(ValueError, match=message):
            model.generate(**inputs, max_new_tokens=2)
        with pytest.raises(ValueError, match=message):
            model.score_batch(inputs.pop("input_ids"), [[[5]], [[5]]], **inputs)
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(**batch, labels=ids[:1])
    with pytest.raises(ValueError, match="document_ids must have input_ids' shape"):
        model(**batch, document_ids=torch.zeros(2, 1, dtype=torch.long))
    for bad in (vocab, -2):
        with pytest.raises(ValueError, match=f"continuations hold token id {bad}, outside"):
            model.score_batch(ids, [[[5]], [[5, bad]]], **{k: v for k, v in batch.items() if k != "input_ids"})
    with pytest.raises(ValueError, match="labels must hold integer token ids"):
        model(**batch, labels=ids.float())
    visual = model.encode_media(batch["images"], batch["num_media"], batch["num_frames"])  # (B, N, R, D)
    text = {k: batch[k] for k in ("input_ids", "attention_mask")}
    for wrong in (visual[..., :-1], visual[:, 0]):  # too narrow; no media axis
        with pytest.raises(ValueError, match=r"visual_tokens must be \(B, N_media, R, "):
            model(**text, visual_tokens=wrong)


def test_integer_labels_of_any_width_train_as_int64_labels(make_model):
    """Labels made in numpy are often int32: cross_entropy refused them, deep inside torch."""
    model, processor = make_model("llama", gates=0.5)
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    expected = model(**batch, labels=batch["input_ids"]).loss
    assert torch.equal(model(**batch, labels=batch["input_ids"].int()).loss, expected)


def test_deepcopy_keeps_hooks_bound_to_the_copy(make_model):
    model, processor = make_model("llama")
    twin = copy.deepcopy(model)
    set_to = 0.9
    with torch.no_grad():
        for block in twin.xattn:
            block.attn_gate.fill_(set_to)
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    with torch.no_grad():
        a, b = model(**batch).logits, twin(**batch).logits
    assert not torch.equal(a, b)
    assert twin._media_context is None and model._media_context is None


def test_xattn_every_places_blocks_like_openflamingo(make_model):
    for every, expected in ((1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3])):
        model, _ = make_model("llama", xattn_every=every)
        assert model.xattn_layer_indices == expected
        assert len(model.xattn) == len(expected)


def test_ungated_mlp_resampler_model_keeps_per_image_masking(make_model):
    model, processor = make_model("llama", gated=False, resampler="mlp")
    assert not any("gate" in n for n, _ in model.xattn.named_parameters())
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    other = processor(PROMPT, images=[random_image(0), random_image(5)])
    with torch.no_grad():
        a, b = model(**batch).logits, model(**other).logits
    second = int((batch["input_ids"][0] == processor.media_token_id).nonzero()[1])
    assert torch.equal(a[:, :second], b[:, :second]) and not torch.allclose(a[:, second:], b[:, second:])


def test_vector_gates_generalise_the_scalar_gate_channel_by_channel(make_model):
    """gate_type="vector": one tanh gate per LM channel. All at 0: the bare LM; all at g: the scalar gate g; one
    channel open: the block writes that channel only."""
    zero, processor = make_model("llama", gates=0.0, gate_type="vector")
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    other = processor(PROMPT, images=[random_image(2), random_image(3)])
    text = processor("Question: what is in the image? Short answer: a red circle.")
    bare = tiny_lm("llama", vocab_size=len(tiny_tokenizer()))
    with torch.no_grad():
        ref = bare(input_ids=text["input_ids"]).logits
        assert (zero(**text).logits[..., : ref.shape[-1]] - ref).abs().max() <= 1e-5
        assert torch.equal(zero(**batch).logits, zero(**other).logits)
    vector, _ = make_model("llama", gates=0.6, gate_type="vector")
    scalar, _ = make_model("llama", gates=0.6)
    assert vector.xattn[0].attn_gate.shape == (vector.lm.config.hidden_size,) and scalar.xattn[0].attn_gate.numel() == 1
    with torch.no_grad():
        assert torch.allclose(vector(**batch).logits, scalar(**batch).logits, atol=1e-6)

    block = vector.xattn[0]
    dim = block.attn_gate.numel()
    with torch.no_grad():
        block.attn_gate.zero_()
        block.attn_gate[3] = 0.8
        block.ffw_gate.zero_()
        visual = torch.randn(1, 2, 8, block.attn.to_kv.in_features)  # (B, N, R, Dv)
        x = torch.randn(1, 5, dim)
        media_index = torch.tensor([[0, 1, 1, 2, 2]])
        delta = block(x, block.project_media(visual), media_index) - x
    assert delta[..., 3].abs()[0, 1:].min() > 0 and torch.equal(delta[..., :3], torch.zeros_like(delta[..., :3]))
    assert torch.equal(delta[..., 4:], torch.zeros_like(delta[..., 4:]))
    assert torch.equal(delta[0, 0], torch.zeros(dim))  # a token before any image: nothing


def test_gradient_checkpointing_gives_the_same_gradients(make_model):
    grads = []
    for checkpointing in (False, True):
        model, processor = make_model("llama")
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        calls, block_calls = [], []
        layer = model.lm.get_submodule(model.decoder_layers_path)[1]
        layer.self_attn.register_forward_hook(lambda m, a, o: calls.append(1))
        # (a pre-hook: the recompute stops once it has remade what backward needs, before the block's output)
        model.xattn[1].register_forward_pre_hook(lambda m, a: block_calls.append(1))
        batch = processor(PROMPT, images=[random_image(0), random_image(1)])
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the layer is recomputed in backward
        assert len(block_calls) == len(calls)  # and so is the block its pre-hook runs (not kept whole)
        assert model._media_context is None
        grads.append({n: p.grad.clone() for n, p in model.trainable_parameters().items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lm_kind, dropout", [("gpt2", dict(resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)),
                                               ("opt", dict(dropout=0.1, attention_dropout=0.1))])
def test_gradient_checkpointing_keeps_the_frozen_lms_dropout_off(make_model, lm_kind, dropout):
    """HF checkpoints a layer only in training mode, yet the frozen LM's dropout stays off (GPT-2's dropout modules,
    OPT's layer-level dropout): the same loss at any RNG seed, and the loss and gradients of a run without it."""
    runs = []
    for checkpointing in (False, True):
        model, processor = make_model(lm_kind, lm_overrides=dropout)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        assert not any(m.training for m in model.lm.modules() if isinstance(m, torch.nn.Dropout))
        layer = model.lm.get_submodule(model.decoder_layers_path)[1]
        calls = []
        next(layer.children()).register_forward_hook(lambda m, a, o: calls.append(1))
        batch = training_batch(processor, ["<image>a red square.<|endofchunk|>", "<image>a blue one<|endofchunk|>"],
                               [1, 1])
        for seed in (1, 2):
            torch.manual_seed(seed)
            runs.append(loss_and_grads(model, batch))
        assert len(calls) == (4 if checkpointing else 2)  # checkpointed: recomputed in backward
    loss, grads = runs[0]
    for other_loss, other_grads in runs[1:]:
        assert torch.equal(other_loss, loss)
        assert other_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], atol=1e-6, rtol=1e-5)


def test_checkpointing_in_training_mode_keeps_dropout_off_outside_a_training_forward(make_model, recwarn):
    """The frozen layers' training flag (for HF to checkpoint them) reached generate, score and a no-grad forward of
    a model left in training mode: transformers checkpoints nothing without gradients, so OPT's layers drew their own
    dropout (random greedy tokens) and generate warned of dropout. They run in eval there: as in eval mode."""
    model, processor = make_model("opt", gates=0.8, lm_overrides=dict(dropout=0.3))
    batch = processor("<image>Question: what is this? Short answer:", images=[random_image(1)])
    cont = [processor.tokenizer(" a cat", add_special_tokens=False)["input_ids"]]
    expected = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    with torch.no_grad():
        logits = model(**batch).logits
    scored = model.score(batch["input_ids"], cont, images=batch["images"])
    model.gradient_checkpointing_enable()
    model.train()
    assert model.lm.get_submodule(model.decoder_layers_path)[0].training  # the flag HF reads
    for seed in (0, 1):
        torch.manual_seed(seed)
        assert torch.equal(model.generate(**batch, max_new_tokens=6, min_new_tokens=6), expected)
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, logits)
        torch.testing.assert_close(model.score(batch["input_ids"], cont, images=batch["images"]), scored)
    assert not [w for w in recwarn if "dropout" in str(w.message)]
    assert model.lm.get_submodule(model.decoder_layers_path)[0].training  # left as the training forward needs it


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_xattn_implementation_gives_the_same_logits(make_model):
    model, processor = make_model("llama")
    batch = processor([PROMPT, "<image>x"], images=[[random_image(0), random_image(1)], [random_image(2)]])
    with torch.no_grad():
        ref = model(**batch, xattn_impl="reference").logits
        for impl in ("segments", "gather", "flex", "auto"):
            torch.testing.assert_close(model(**batch, xattn_impl=impl).logits, ref, atol=1e-5, rtol=1e-4)


def test_forward_cache_continues_the_sequence_under_either_name(make_model):
    """The LM's KV cache comes back as `cache` (transformers >= 5.24 names it so; `past_key_values` reads the same
    object) and continuing a text prompt from it gives the logits of one full pass."""
    model, processor = make_model("llama")
    ids = processor("A red circle and a blue square")["input_ids"]
    split = ids.shape[1] - 2
    with torch.no_grad():
        full = model(input_ids=ids).logits
        head = model(input_ids=ids[:, :split], use_cache=True)
        assert head.cache is not None and head.past_key_values is head.cache
        tail = model(input_ids=ids[:, split:], use_cache=True, position_ids=torch.arange(split, ids.shape[1])[None],
                     **{lm_cache_argument(model.lm): head.cache}).logits
    torch.testing.assert_close(tail, full[:, split:], atol=1e-5, rtol=1e-5)


def test_imageless_rows_skip_blocks_on_the_papers_rule():
    """`imageless_rows_skip_blocks` (Multimodal-GPT's text-only prompts; tests/test_mmgpt_equal.py compares with
    it under v1's rule): a row without any image computes the bare LM beside a row with images, whose text before
    its first image still runs the blocks; a chunked prefill whose first chunk holds no image yet equals one forward;
    chunked `generate` and packed rows refuse it."""
    from flamingo.config import FlamingoConfig
    from flamingo.model.generation import generate
    from flamingo.model.prefill import Prefill
    from flamingo.runtime.compat import CONTINUOUS_BATCHING
    from flamingo.tiny import tiny_flamingo

    model, processor = tiny_flamingo(imageless_rows_skip_blocks=True)
    prompts = ["A text without images.", "Some text first, then <image>a photo of a cat."]
    batch = processor(prompts, images=[[], [random_image(0)]], padding_side="right")
    with torch.no_grad():
        logits = model(**batch).logits
        n = int(batch["attention_mask"][0].sum())
        bare = model.lm(input_ids=batch["input_ids"][:1, :n]).logits
        assert (logits[0, :n] - bare[0]).abs().max() <= 1e-5
        flamingo_rule = copy.deepcopy(model)
        flamingo_rule.config.imageless_rows_skip_blocks = False
        other = flamingo_rule(**batch).logits
    assert (other[0, :n] - bare[0]).abs().max() > 1e-3  # the blocks' FFW moves text that sees no image
    m = int(batch["attention_mask"][1].sum())
    assert torch.allclose(logits[1, :m], other[1, :m], atol=1e-6)  # a row with an image runs every block

    if CONTINUOUS_BATCHING:
        one = processor(prompts[1], images=[random_image(0)])
        prefill, row = Prefill(model, one["input_ids"][0], one["images"], one["num_media"], chunk=3), None
        while row is None:
            row = prefill.step()
        assert (row.logits - logits[1, m - 1]).abs().max() <= 1e-5

    with pytest.raises(ValueError, match="imageless_rows_skip_blocks"):
        FlamingoConfig(imageless_rows_skip_blocks=True, num_image_references=2)
    with pytest.raises(ValueError, match="imageless_rows_skip_blocks"):
        generate(model, batch["input_ids"][1:], images=batch["images"][1:], num_media=batch["num_media"][1:],
                 max_new_tokens=2, prefill_chunk_size=4)
    with pytest.raises(ValueError, match="imageless_rows_skip_blocks"):
        model(**batch, document_ids=torch.zeros_like(batch["input_ids"]))
