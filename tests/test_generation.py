"""Cached generation and scoring: token-identical to uncached greedy, batched == one-by-one, media K/V projected
once per prompt, new tokens see their sample's last image, beam search = a reference beam search."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from flamingo.runtime.compat import TRANSFORMERS, TRANSFORMERS_VERSION
from flamingo.tiny import random_image, tiny_flamingo

from helpers import continuation_logprobs_reference

# hidden-32 models gain nothing from intra-op threads; on shared cores the threads' spinning is most of each test's cost
pytestmark = pytest.mark.usefixtures("one_thread")

SHOTS = "<image>Question: what? Short answer: red<|endofchunk|>"
PROMPTS = {
    0: ("Question: what is this? Short answer:", []),
    1: ("<image>Question: what is this? Short answer:", [random_image(1)]),
    3: (SHOTS * 2 + "<image>Question: what is this? Short answer:", [random_image(i) for i in range(3)]),
    "video": ("<image>Question: what moves? Short answer:", [[random_image(i) for i in range(4)]]),
}


def _banned(model):
    return [model.config.media_token_id]


def uncached_greedy(model, processor, prompt, media, steps):
    batch = processor(prompt, images=media)
    ids = batch["input_ids"]
    extra = {k: batch[k] for k in ("images", "num_media", "num_frames") if batch.get(k) is not None}
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, **extra).logits[0, -1]
        logits[_banned(model)] = -float("inf")
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("case", list(PROMPTS))
def test_cached_equals_uncached_greedy(make_model, case):
    model, processor = make_model("llama")
    prompt, media = PROMPTS[case]
    batch = processor(prompt, images=media)
    out = model.generate(**batch, max_new_tokens=10, min_new_tokens=10)
    assert out[0, batch["input_ids"].shape[1]:].tolist() == uncached_greedy(model, processor, prompt, media, 10)


def _generate_logits(model, batch, steps, **kwargs):
    """generate's tokens (rows, T + steps) and the logits of each step (rows, steps, V)."""
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def _forward_logits(model, batch, sequences):
    """An uncached forward's logits at the positions that predict `sequences`' new tokens, (1, new, V)."""
    t = batch["input_ids"].shape[1]
    extra = {k: batch[k] for k in ("images", "num_media", "num_frames") if batch.get(k) is not None}
    with torch.no_grad():
        return model(sequences[:, :-1], **extra).logits[:, t - 1:]


def test_prompt_prefilled_in_chunks_decodes_like_one_prefill(make_model):
    """The phase is set by the caller: every chunk of a chunked prefill is PREFILL (its tokens see their own images),
    and decoding starts only after the prompt's logits, seeing the prompt's last image (not the last image of the
    chunk that first ran a block: decoding read an earlier image when the first chunk ended before the last one).
    Logits, not tokens: the tiny model's greedy tokens barely depend on the images."""
    model, processor = make_model("llama", gates=1.0)
    prompt, media = PROMPTS[3]
    batch = processor(prompt, images=media)
    t = batch["input_ids"].shape[1]
    images_at = (batch["input_ids"][0] == model.config.media_token_id).nonzero().flatten().tolist()
    assert len(images_at) == 3 and images_at[-1] > 7  # the last image lies past the first chunk of most sizes
    whole, whole_logits = _generate_logits(model, batch, 6)
    torch.testing.assert_close(whole_logits, _forward_logits(model, batch, whole), atol=1e-4, rtol=1e-4)
    for chunk in (5, 7, images_at[-1] + 1, t - 1):  # chunks that start at an image, split inside an image's text,
        # end just after the last image, hold all of it but the last token
        chunked, logits = _generate_logits(model, batch, 6, prefill_chunk_size=chunk)
        torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=1e-5, msg=f"chunks of {chunk}")
        assert torch.equal(chunked, whole)

    cases = [PROMPTS[3], ("<image>a b<|endofchunk|><image>c", [random_image(7), random_image(8)])]
    padded = processor([p for p, _ in cases], images=[m for _, m in cases], padding_side="left")  # the second row's
    # images are both in the last chunk
    if TRANSFORMERS < (5, 0):  # its chunks count a row's left padding in the positions (docs/compat.md): refused
        with pytest.raises(ValueError, match="left-padded batch needs transformers >= 5"):
            model.generate(**padded, max_new_tokens=4, prefill_chunk_size=5)
        return
    whole, whole_logits = _generate_logits(model, padded, 4)
    _, logits = _generate_logits(model, padded, 4, prefill_chunk_size=5)
    torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm_kind", ["llama", "gpt2", "opt", "mosaic_gpt"])
def test_batched_left_padded_equals_one_by_one(make_model, lm_kind):
    model, processor = make_model(lm_kind)
    cases = [PROMPTS[3], PROMPTS[0], PROMPTS[1]]
    batch = processor([p for p, _ in cases], images=[m for _, m in cases], padding_side="left")
    out = model.generate(**batch, max_new_tokens=8, min_new_tokens=8)
    for i, (prompt, media) in enumerate(cases):
        alone = processor(prompt, images=media)
        single = model.generate(**alone, max_new_tokens=8, min_new_tokens=8)
        assert out[i, batch["input_ids"].shape[1]:].tolist() == single[0, alone["input_ids"].shape[1]:].tolist()


def test_media_kv_projected_once_per_prompt(make_model):
    model, processor = make_model("llama")
    calls = []
    for block in model.xattn:
        block.attn.to_kv.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    batch = processor(*PROMPTS[3])
    model.generate(**batch, max_new_tokens=6, min_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert len(calls) == len(model.xattn)  # once per block, for the 1 sample (beams are expanded by indexing)
    assert all(shape[0] == 1 for shape in calls)


def test_new_tokens_see_the_last_image_and_only_it(make_model):
    model, processor = make_model("llama")
    prompt = "<image>first<|endofchunk|><image>second:"
    recorded = []
    handle = model.xattn[0].attn.register_forward_hook(lambda m, a, o: recorded.append(o.detach().clone()))

    def decode_outputs(images):
        recorded.clear()
        batch = processor(prompt, images=images)
        model.score(batch["input_ids"], [[5, 6, 7, 8]], images=batch["images"])
        return recorded[-1]  # block 0 (before layer 0: queries are the tokens' own embeddings) on new tokens

    base = decode_outputs([random_image(0), random_image(1)])
    assert base.abs().sum() > 0  # new tokens do cross-attend (flamingo-mini #6: they must not lose the image)
    assert torch.equal(decode_outputs([random_image(9), random_image(1)]), base)  # earlier image swapped
    assert not torch.allclose(decode_outputs([random_image(0), random_image(8)]), base)  # last image swapped
    handle.remove()

    seen = []
    model.pads_exactly()  # the padding probe's own LM calls (once per model) before the hook counts generate's
    hook = model.lm.get_input_embeddings().register_forward_hook(
        lambda m, a, o: seen.append(model._media_context.last_media_index.clone()))
    batch = processor([prompt, "<image>one"], images=[[random_image(0), random_image(1)], [random_image(2)]])
    model.generate(**batch, max_new_tokens=4, min_new_tokens=4)
    hook.remove()
    assert len(seen) == 4 and all(index.tolist() == [2, 1] for index in seen)  # each step: the row's last image


def _reference_beam_search(model, batch, beams, steps, banned):
    extra = {k: batch[k] for k in ("images", "num_media", "num_frames") if batch.get(k) is not None}
    hyps = [(batch["input_ids"][0].tolist(), 0.0)]
    for _ in range(steps):
        candidates = []
        for seq, total in hyps:
            with torch.no_grad():
                logits = model(torch.tensor([seq]), **extra).logits[0, -1]
            logits[banned] = -float("inf")
            logprobs = F.log_softmax(logits.float(), dim=-1)
            top = logprobs.topk(beams)
            candidates += [(seq + [int(t)], total + float(s)) for s, t in zip(top.values, top.indices)]
        hyps = sorted(candidates, key=lambda h: -h[1])[:beams]
    return hyps[0][0][batch["input_ids"].shape[1]:]


def test_beam_search_equals_reference_beam_search(make_model):
    model, processor = make_model("llama", gates=0.8)
    batch = processor(*PROMPTS[3])
    steps = 4
    banned = [model.config.media_token_id, model.config.end_of_chunk_token_id, 0]
    out = model.generate(**batch, num_beams=3, max_new_tokens=steps, min_new_tokens=steps, length_penalty=0.0)
    assert out[0, batch["input_ids"].shape[1]:].tolist() == _reference_beam_search(model, batch, 3, steps, banned)


def test_batched_beam_search_scores_each_sample_as_alone(make_model):
    """Two prompts with other images, two beams and two returned sequences each: generate's rows are sample-major
    (sample i's beams are rows 2i, 2i + 1), and each row must read its own sample's image K/V, so every sample's beam
    scores are those it has alone. Scores, not tokens: the tiny model's tokens barely depend on the images. (Three
    beams would hide a wrong order: only beam 0 is live at the first step.)"""
    model, processor = make_model("llama", gates=1.0)
    prompts = ["<image>Question: what is this? Short answer:", "<image>Question: what is that? Short answer:"]
    media = [[random_image(1)], [random_image(5)]]
    kwargs = dict(num_beams=2, num_return_sequences=2, max_new_tokens=4, min_new_tokens=4, output_scores=True,
                  return_dict_in_generate=True)
    batch = processor(prompts, images=media, padding_side="left")
    out = model.generate(**batch, **kwargs)
    for i in range(2):
        alone = processor(prompts[i], images=media[i])
        single = model.generate(**alone, **kwargs)
        rows = slice(2 * i, 2 * i + 2)
        assert out.sequences[rows, batch["input_ids"].shape[1]:].tolist() == \
            single.sequences[:, alone["input_ids"].shape[1]:].tolist()
        torch.testing.assert_close(out.sequences_scores[rows], single.sequences_scores, atol=1e-5, rtol=0)


def test_gate_zero_beam_search_equals_lm_only_hf_beam_search(make_model):
    model, processor = make_model("llama", gates=0.0)
    prompt = "Question: what is this? Short answer:"
    batch = processor(prompt)
    ours = model.generate(**batch, num_beams=3, max_new_tokens=6)
    from flamingo.model.generation import generation_config_for

    config = generation_config_for(model, num_beams=3, max_new_tokens=6)
    # outside a Flamingo call the hooked LM is the bare LM
    lm_only = model.lm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                generation_config=config)
    assert ours.tolist() == lm_only.tolist()


def test_sampling_repeats_under_a_seed_and_repetition_penalty_applies(make_model):
    model, processor = make_model("llama")
    batch = processor(*PROMPTS[1])
    torch.manual_seed(0)
    a = model.generate(**batch, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=5,
                       num_return_sequences=3)
    torch.manual_seed(0)
    b = model.generate(**batch, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=5,
                       num_return_sequences=3)
    assert a.shape[0] == 3 and torch.equal(a, b)
    plain = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    penalised = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, repetition_penalty=50.0)
    new = penalised[0, batch["input_ids"].shape[1]:].tolist()
    assert len(set(new)) == len(new) and not torch.equal(plain, penalised)


def test_generation_stops_at_end_of_chunk(make_model):
    from transformers import LogitsProcessorList, SequenceBiasLogitsProcessor

    model, processor = make_model("llama")
    batch = processor(*PROMPTS[1])
    eoc = model.config.end_of_chunk_token_id
    push = LogitsProcessorList([SequenceBiasLogitsProcessor({(eoc,): 1e4})])  # make <|endofchunk|> certain
    out = model.generate(**batch, max_new_tokens=10, logits_processor=push)
    assert out[0, -1].item() == eoc and out.shape[1] == batch["input_ids"].shape[1] + 1


def test_score_equals_plain_forward_logprobs(make_model):
    model, processor = make_model("llama")
    for case in (0, 3, "video"):
        prompt, media = PROMPTS[case]
        batch = processor(prompt, images=media)
        extra = {k: batch[k] for k in ("images", "num_media", "num_frames") if batch.get(k) is not None}
        candidates = [[50, 60, 70], [80], [90, 100, 110, 120, 130]]
        scores = model.score(batch["input_ids"], candidates, **extra, batch_size=2)
        expected = [continuation_logprobs_reference(model, batch["input_ids"], c, **extra) for c in candidates]
        torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-4, rtol=1e-5)


POSITION_LIMITS = {"gpt2": "n_positions", "mpt": "max_seq_len"}  # the others: max_position_embeddings


@pytest.mark.parametrize("lm_kind", ["gpt2", "opt", "llama", "mpt"])
def test_generation_and_scoring_stay_within_the_lm_positions(lm_kind, caplog):
    """An LM of 24 positions. GPT-2 and OPT learn one embedding per position, MPT's ALiBi table has 24 (its config
    names them `max_seq_len`, which was not read), so past them they failed deep inside torch. Generation now stops
    at the last position (max_new_tokens capped, logged), with the tokens it would have made anyway; a candidate
    that ends exactly at the last position is scored as a plain forward scores it, one token more is a clear error,
    and so are a prompt that leaves no position (the processor refuses it first) and a forward longer than the
    positions."""

    positions = {POSITION_LIMITS.get(lm_kind, "max_position_embeddings"): 24}
    model, processor = tiny_flamingo(lm_kind, lm_overrides=positions)
    batch = processor("<image>a b c d e", images=[random_image(0)])
    t = batch["input_ids"].shape[1]
    with caplog.at_level("WARNING", logger="flamingo.model.generation"):
        capped = model.generate(**batch, max_new_tokens=40, min_new_tokens=40)
    assert f"max_new_tokens=40 capped to {24 - t}" in caplog.text
    assert torch.equal(capped, model.generate(**batch, max_new_tokens=24 - t, min_new_tokens=24 - t))

    extra = {k: batch[k] for k in ("images", "num_media")}
    fits = list(range(50, 50 + 25 - t))  # its last token is predicted at position 23, never fed
    full = torch.cat([batch["input_ids"], torch.tensor([fits])], dim=1)[:, :-1]  # (1, 24)
    with torch.no_grad():
        logprobs = model(full, **extra).logits[0, t - 1:].float().log_softmax(-1)  # (len(fits), V)
    expected = logprobs.gather(-1, torch.tensor(fits)[:, None]).sum()
    torch.testing.assert_close(model.score(batch["input_ids"], [fits], **extra)[0], expected, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="need 25 positions; the LM has 24"):
        model.score(batch["input_ids"], [[7], fits + [50]], **extra)

    assert processor.max_length == 24  # from the LM's positions (the tiny tokenizer names no context)
    with pytest.raises(ValueError, match="longer than max_length=24"):
        processor("<image>" + " a" * 30, images=[random_image(0)])
    ids = torch.tensor([processor.token_ids("<image>" + " a" * 30)[:24]])  # (1, 24): every position taken
    with pytest.raises(ValueError, match="none is left to generate into"):
        model.generate(ids, images=batch["images"], max_new_tokens=1)
    with pytest.raises(ValueError, match="25 tokens per row, but the LM has 24 positions"):
        model(torch.cat([ids, ids[:, -1:]], dim=1), images=batch["images"])
    # a batch padded wider than the positions, its rows short: the padding is named, not the rows' length
    padded = torch.cat([torch.zeros(1, 20, dtype=torch.long), ids[:, :10]], dim=1)  # (1, 30): 10 tokens, left-padded
    mask = (torch.arange(30) >= 20).long()[None]
    with pytest.raises(ValueError, match="the batch is padded to 30 columns \\(its longest row holds 10 tokens\\), "
                                         "but the LM has 24 positions"):
        model(padded, attention_mask=mask, images=batch["images"])
    # packed rows (training's pack_tokens; LMs that keep packed samples apart): each sample's own length counts,
    # never the row's (a sample past the positions crashed in GPT-2's table, or ran past them on a rotary LM)
    row = torch.cat([ids, ids[:, -1:]], dim=1)  # (1, 25)
    for lengths, longest in (([16, 9], None), ([24, 1], None), ([25], 25), ([1, 24], None)):
        if lm_kind in ("opt", "mpt"):
            break
        docs = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]  # (1, 25)
        if longest is None:
            if lm_kind == "gpt2" and int(transformers.__version__.split(".")[0]) < 5:
                continue  # (transformers 4's GPT-2 masks with a buffer of its positions: no row longer than them)
            model(row, images=batch["images"], document_ids=docs)  # each sample within the positions: runs
        else:
            with pytest.raises(ValueError, match=f"{longest} tokens per packed sample, but the LM has 24"):
                model(row, images=batch["images"], document_ids=docs)


@pytest.mark.slow
@pytest.mark.parametrize("lm_kind", ["llama", "mosaic_gpt"])  # mosaic_gpt: ALiBi, its bias made by the model's hook
def test_compiled_static_cache_decoding_equals_eager_without_recompiles(make_model, lm_kind):
    """generate(compile=True): the decode step is captured whole (fullgraph: a graph break raises), gives the eager
    tokens, and one graph serves prompts with different lengths and image counts (the GPU path of CUDA graphs)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from flamingo.model.generation import compile_config
    from flamingo.runtime.compat import STATIC_CACHE_MASK_HOOK

    if lm_kind == "mosaic_gpt" and not STATIC_CACHE_MASK_HOOK:
        pytest.skip("MosaicGPT decodes with a static cache from transformers 5.25 on")
    model, processor = make_model(lm_kind)
    torch._dynamo.reset()
    counters.clear()
    config = compile_config(backend="aot_eager")  # traces like inductor, without its C++ build time
    for case in (3, 1):
        batch = processor(*PROMPTS[case])
        eager = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
        compiled = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, compile=True, compile_config=config)
        assert compiled.tolist() == eager.tolist()
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_compiled_decoding_serves_every_batch_size_with_one_graph(make_model):
    """Batches of 1 to 5 rows (and 2 prompts x 2 returned sequences) decode in the graph the first compiled: each
    block's decode K/V are read by block index, not by a key holding the row count (which compiled a graph per row
    count, and under fullgraph raised at the ninth). Each gives the eager tokens."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from flamingo.model.generation import compile_config

    model, processor = make_model("llama")
    torch._dynamo.reset()
    counters.clear()
    config = compile_config(backend="aot_eager")
    cases = [PROMPTS[1], PROMPTS[3], PROMPTS["video"], PROMPTS[1], PROMPTS[3]]
    for rows, returns in ((1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (2, 2)):
        batch = processor([p for p, _ in cases[:rows]], images=[m for _, m in cases[:rows]], padding_side="left")
        kwargs = dict(max_new_tokens=4, min_new_tokens=4, num_return_sequences=returns, do_sample=returns > 1)
        torch.manual_seed(0)
        eager = model.generate(**batch, **kwargs)
        torch.manual_seed(0)
        compiled = model.generate(**batch, **kwargs, compile=True, compile_config=config)
        assert compiled.tolist() == eager.tolist(), rows
    assert counters["stats"]["unique_graphs"] <= 2  # the first shape, then one with the row count dynamic


def test_compiled_beam_search_says_it_decodes_eagerly(make_model):
    model, processor = make_model("llama")
    batch = processor(*PROMPTS[1])
    with pytest.warns(UserWarning, match="beam search does not run the compiled decode step"):
        model.generate(**batch, max_new_tokens=2, num_beams=2, compile=True)


def test_a_loss_forward_builds_no_kv_cache(make_model):
    """Validation runs the model in eval mode with labels: no cache (a compiled layer compiled a graph per cache
    slot), the loss and logits unchanged."""
    model, processor = make_model("llama")
    batch = processor(*PROMPTS[3])
    out = model(**batch, labels=batch["input_ids"])
    plain = model(**batch)
    assert getattr(out, "past_key_values", None) is None and getattr(plain, "past_key_values", None) is not None
    assert torch.equal(out.logits, plain.logits)


@pytest.mark.parametrize("lm_kind", ["llama", "gpt2"])
def test_score_batch_of_left_padded_contexts_equals_each_alone(make_model, lm_kind):
    """Contexts of different lengths and image counts (0, 3, video), each with its own number of candidates, in one
    left-padded batch and in row chunks that split a context's candidates: each context's scores are its `score`."""
    model, processor = make_model(lm_kind)
    cases = [PROMPTS[3], PROMPTS[0], PROMPTS["video"], PROMPTS[1]]
    candidates = [[[50, 60, 70], [80]], [[90, 100, 110, 120, 130]], [[7], [8, 9], [10, 11, 12]], [[13, 14]]]
    batch = processor([p for p, _ in cases], images=[m for _, m in cases], padding_side="left")
    head_rows = []
    model.pads_exactly()  # the padding probe's own LM calls (once per model) before the hook records the batch's
    hook = model.lm.get_output_embeddings().register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[:2]))
    for rows in (64, 3):
        head_rows.clear()
        scores = model.score_batch(batch["input_ids"], candidates, attention_mask=batch["attention_mask"],
                                   images=batch["images"], num_media=batch["num_media"],
                                   num_frames=batch["num_frames"], batch_size=rows)
        assert tuple(head_rows[0]) == (len(cases), 1)  # the contexts' logits: last position only
        for (prompt, media), cands, got in zip(cases, candidates, scores):
            alone = processor(prompt, images=media)
            extra = {k: alone[k] for k in ("images", "num_media", "num_frames") if alone.get(k) is not None}
            torch.testing.assert_close(got, model.score(alone["input_ids"], cands, **extra), atol=1e-5, rtol=1e-5)
    hook.remove()


@pytest.mark.parametrize("lm_kind", ["gpt2", "opt", "mpt"])
def test_score_batch_near_the_position_limit_with_contexts_of_different_lengths(lm_kind):
    """Contexts of 21 and 2 tokens in one batch, each with a candidate that fits it alone: padded together they run
    past the LM's 40 positions (GPT-2's and OPT's learned tables: an IndexError inside torch; MPT's ALiBi over 58
    keys, and transformers 4's GPT-2 causal-mask buffer: shape errors). Such a batch is scored a context at a time,
    without its padding: each context's scores are its own."""
    positions = {POSITION_LIMITS.get(lm_kind, "max_position_embeddings"): 40}
    model, processor = tiny_flamingo(lm_kind, gates=0.8, lm_overrides=positions)
    cases = [("Q<image>a cat sat on the mat and then the dog ran in", [random_image(0)]),
             ("<image>x", [random_image(1)])]
    batch = processor([p for p, _ in cases], images=[m for _, m in cases], padding_side="left")
    short = int(batch["attention_mask"][1].sum())
    candidates = [[[5, 6]], [list(range(40, 40 + 40 - short))]]  # the second fills its context's 40 positions
    for rows in (64, 1):
        call = dict(attention_mask=batch["attention_mask"], images=batch["images"], num_media=batch["num_media"],
                    batch_size=rows)
        scores = model.score_batch(batch["input_ids"], candidates, **call)
        model.lm.generation_config.pad_token_id = int(batch["input_ids"][0, 0])  # "Q", a real token: the mask says
        try:
            assert all(torch.equal(a, b) for a, b in zip(model.score_batch(batch["input_ids"], candidates, **call),
                                                         scores))
        finally:
            model.lm.generation_config.pad_token_id = None
        for (prompt, media), cands, got in zip(cases, candidates, scores):
            alone = processor(prompt, images=media)
            want = model.score(alone["input_ids"], cands, images=alone["images"], num_media=alone["num_media"])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_score_batch_rejects_right_padding_and_count_mismatch(make_model):
    model, processor = make_model("llama")
    batch = processor([PROMPTS[0][0], "Question:"], padding_side="right")
    with pytest.raises(ValueError, match="left padding"):
        model.score_batch(batch["input_ids"], [[[5]], [[6]]], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="candidate lists"):
        model.score_batch(batch["input_ids"], [[[5]]], attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("attend_next_image", [False, True])
def test_an_lm_configured_without_a_cache_still_decodes_on_one(make_model, attend_next_image):
    """MPT's config says use_cache=False: transformers then fed the whole sequence each step, and every prompt token
    ran under the decode rule (the prompt's last image). generate decodes on the cache whatever the LM's config
    says, and refuses use_cache=False and the modes that feed several tokens a step."""
    model, processor = make_model("mpt", gates=0.8, attend_next_image=attend_next_image)
    assert model.lm.config.use_cache is False
    prompt, media = PROMPTS[3]
    batch = processor(prompt, images=media)
    out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    assert out[0, batch["input_ids"].shape[1]:].tolist() == uncached_greedy(model, processor, prompt, media, 6)
    with pytest.raises(ValueError, match="use_cache=True"):
        model.generate(**batch, max_new_tokens=2, use_cache=False)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens: assisted and prompt-lookup"):
        model.generate(**batch, max_new_tokens=2, prompt_lookup_num_tokens=3)


def test_generate_refuses_a_cached_prompt_prefix_and_classifier_free_guidance(make_model):
    """A prompt prefix's cache (`past_key_values`) made the uncached tail count its images from 0: no image, or the
    first where the second stood (logits off by 0.61, silently); classifier-free guidance's extra LM call ran inside
    the call and counted a trailing `<image>` again (an IndexError alone, another row's empty image slot in a batch).
    Both are refused by name."""
    model, processor = make_model("llama", gates=0.8)
    batch = processor("<image>A photo of<|endofchunk|><image>a cat<image>", images=[random_image(i) for i in range(3)])
    with torch.no_grad():
        cache = model.lm(input_ids=batch["input_ids"][:, :4], use_cache=True).past_key_values  # its first 4 tokens
    for name in ("past_key_values", "cache"):  # transformers 5.24 on names it `cache`
        with pytest.raises(ValueError, match=f"{name}: generate prefills the whole prompt"):
            model.generate(**batch, max_new_tokens=2, **{name: cache})
    for scale in (1.5, 0.0):  # 0: the unconditional logits only, a guided call all the same
        with pytest.raises(ValueError, match="guidance_scale / negative_prompt_ids: classifier-free guidance"):
            model.generate(**batch, max_new_tokens=2, guidance_scale=scale)
    with pytest.raises(ValueError, match="classifier-free guidance"):
        model.generate(**batch, generation_config=transformers.GenerationConfig(guidance_scale=2.0, max_new_tokens=2))
    model.generate(**batch, max_new_tokens=2, guidance_scale=1.0)  # 1: no guidance


def test_decoding_modes_set_in_a_config_are_refused_or_left_off(make_model):
    """Prompt-lookup decoding set in a GenerationConfig slipped past the keyword-only refusal (wrong with reference
    tokens: logits off by 0.08); token healing re-tokenized the prompt from its text and dropped every `<image>` (the
    bare LM's answer, silently). A caller's request is refused; an LM's own generation_config setting them is
    neutralized, as its penalties are."""
    model, processor = make_model("llama", gates=0.8)
    batch = processor("<image>A photo of", images=[random_image(0)])
    for config in (transformers.GenerationConfig(prompt_lookup_num_tokens=3, max_new_tokens=2),
                   transformers.GenerationConfig(token_healing=True, max_new_tokens=2)):
        with pytest.raises(ValueError, match="prompt_lookup_num_tokens: assisted|token_healing: transformers"):
            model.generate(**batch, generation_config=config)
    with pytest.raises(ValueError, match="token_healing"):
        model.generate(**batch, max_new_tokens=2, token_healing=True, tokenizer=processor.tokenizer)
    plain = model.generate(**batch, max_new_tokens=4, min_new_tokens=4)
    model.lm.generation_config.prompt_lookup_num_tokens = 3  # as a Hub LM's generation_config.json may
    model.lm.generation_config.token_healing = True
    try:
        assert torch.equal(model.generate(**batch, max_new_tokens=4, min_new_tokens=4), plain)
    finally:
        model.lm.generation_config.prompt_lookup_num_tokens = None
        model.lm.generation_config.token_healing = False


@pytest.mark.parametrize("lm_kind", ["llama", "gpt2"])
def test_generate_with_no_length_makes_transformers_default_number_of_tokens(lm_kind, caplog):
    """`model.generate(**inputs)`, the first call a transformers user types: transformers 5 sets neither max_length
    nor max_new_tokens, and the position check subtracted from None (a TypeError). It generates what transformers
    would (20 new tokens), capped by the LM's positions as any length is."""
    if TRANSFORMERS < (5, 0):
        pytest.skip(f"transformers {TRANSFORMERS_VERSION} defaults max_length to 20 (5 sets none)")
    model, processor = tiny_flamingo(lm_kind, gates=0.8, lm_overrides={POSITION_LIMITS.get(
        lm_kind, "max_position_embeddings"): 64})
    model.lm.generation_config.max_length = model.lm.generation_config.max_new_tokens = None
    batch = processor("<image>A photo of", images=[random_image(0)])
    out = model.generate(**batch, min_new_tokens=20)
    assert torch.equal(out, model.generate(**batch, max_new_tokens=20, min_new_tokens=20))
    t = batch["input_ids"].shape[1]
    short, _ = tiny_flamingo(lm_kind, gates=0.8, lm_overrides={POSITION_LIMITS.get(
        lm_kind, "max_position_embeddings"): t + 5})
    short.lm.generation_config.max_length = short.lm.generation_config.max_new_tokens = None
    with caplog.at_level("WARNING", logger="flamingo.model.generation"):
        assert short.generate(**batch, min_new_tokens=20).shape[1] == t + 5
    assert "max_new_tokens=20 capped to 5" in caplog.text


@pytest.mark.slow
def test_a_copy_of_a_model_that_generated_compiled_decodes_with_its_own_weights(make_model):
    """transformers keeps the compiled `__call__` on the LM; a deep copy shared the original's, so the copy's
    compiled decode steps ran the original LM on the copy's cache (other tokens, silently). The copy compiles its
    own: compiled == eager on the copy."""
    import copy

    from flamingo.model.generation import compile_config
    from flamingo.tiny import set_gates

    model, processor = make_model("llama", gates=0.8)
    batch = processor("<image>a cat<|endofchunk|><image>two", images=[random_image(1), random_image(2)])

    def run(m, compile):
        extra = {"compile": True, "compile_config": compile_config("cpu", backend="eager")} if compile else {}
        out = m.generate(**batch, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True,
                         output_logits=True, **extra)
        return torch.stack(out.logits, 1)

    run(model, compile=True)
    twin = copy.deepcopy(model)
    set_gates(twin, 2.0)  # the copy is another model now
    eager = run(twin, compile=False)
    # transformers compiling by itself (a static cache with a config that compiles: on a GPU, any static cache)
    out = twin.generate(**batch, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True, output_logits=True,
                        cache_implementation="static", compile_config=compile_config("cpu", backend="eager"))
    torch.testing.assert_close(torch.stack(out.logits, 1), eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(twin, compile=True), eager, atol=1e-5, rtol=1e-5)


def test_generate_hands_transformers_one_config_it_keeps_whole(make_model, monkeypatch):
    """transformers 5 warns (deprecated) about generation arguments given beside a config, so the cache rule travels
    on the config; 4.x would replace each of its fields that equals GenerationConfig's default with the model's
    (use_cache, do_sample, the penalties): told not to (use_model_defaults=False)."""
    from flamingo.runtime.compat import TRANSFORMERS

    model, processor = make_model("mpt", gates=0.8)
    seen = []
    prepare = type(model.lm)._prepare_generation_config

    def spy(self, generation_config, *args, **kwargs):  # (4.x passes use_model_defaults positionally)
        seen.append((generation_config.use_cache, args, set(kwargs)))
        return prepare(self, generation_config, *args, **kwargs)

    monkeypatch.setattr(type(model.lm), "_prepare_generation_config", spy)
    prompt, media = PROMPTS[3]
    model.generate(**processor(prompt, images=media), max_new_tokens=2)
    (use_cache, args, arguments), = seen
    assert use_cache is True and "use_cache" not in arguments
    assert args == ((False,) if TRANSFORMERS < (5, 0) else ())


def test_keywords_update_a_given_generation_config(make_model):
    """As in transformers: generate(generation_config=cfg, max_new_tokens=3) takes 3 (the keywords were dropped)."""
    from flamingo.model.generation import generation_config_for

    model, processor = make_model("llama")
    batch = processor(*PROMPTS[1])
    config = generation_config_for(model, max_new_tokens=10, min_new_tokens=10)
    out = model.generate(**batch, generation_config=config, max_new_tokens=3, min_new_tokens=3)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3 and config.max_new_tokens == 10
    beams = model.generate(**batch, generation_config=config, num_beams=3, num_return_sequences=3)
    assert beams.shape[0] == 3


def test_a_batch_whose_rows_hold_no_medium_generates_and_scores_as_text(make_model):
    """images given but num_media all 0 (a padded media tensor of a text-only batch): as forward, no tower call
    (it failed inside the vision tower)."""
    model, processor = make_model("llama")
    full = processor(PROMPTS[0][0])
    batch = {"input_ids": full["input_ids"], "attention_mask": full["attention_mask"]}
    images = torch.zeros(1, 1, 1, 3, 32, 32)
    none = torch.zeros(1, dtype=torch.long)
    plain = model.generate(**batch, max_new_tokens=4)
    assert torch.equal(model.generate(**batch, images=images, num_media=none, max_new_tokens=4), plain)
    scored = model.score_batch(batch["input_ids"], [[[5, 6]]], images=images, num_media=none)
    torch.testing.assert_close(scored[0], model.score_batch(batch["input_ids"], [[[5, 6]]])[0])


def test_score_batch_refuses_candidates_it_cannot_score(make_model):
    model, processor = make_model("llama")
    ids = processor(PROMPTS[0][0])["input_ids"]
    image = model.config.media_token_id
    for candidates, message in (([[image, 5]], "may not hold <image> before its last token"),
                                ([[5.7]], "5.7: token ids are integers"), ([["5"]], "'5': token ids are integers")):
        with pytest.raises(ValueError, match=message):
            model.score_batch(ids, [candidates])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.score_batch(ids, [[[5]]], batch_size=0)
    model.score_batch(ids, [[[5, image]]])  # an `<image>` last is only scored, never fed


def test_a_padded_batch_without_its_mask_is_read_as_transformers_reads_it(make_model):
    """A batch given without attention_mask had every pad attended (all-ones mask): its padding is read off the
    model's pad id, as transformers' generate reads it. Right padding and a row of padding alone are refused."""
    model, processor = make_model("llama", gates=0.8)
    prompts = [PROMPTS[3][0], PROMPTS[1][0]]
    batch = processor(prompts, images=[PROMPTS[3][1], PROMPTS[1][1]])
    assert not bool(batch["attention_mask"].all())  # the second row is padded
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
    expected = model.generate(**batch, max_new_tokens=4, min_new_tokens=4)
    assert torch.equal(model.generate(**unmasked, max_new_tokens=4, min_new_tokens=4), expected)
    continuations = [[[5, 6]], [[7]]]
    assert [torch.allclose(a, b) for a, b in zip(model.score_batch(unmasked["input_ids"], continuations,
                                                                   images=batch["images"],
                                                                   num_media=batch["num_media"],
                                                                   num_frames=batch["num_frames"]),
                                                 model.score_batch(batch["input_ids"], continuations, **{
                                                     k: batch[k] for k in ("attention_mask", "images", "num_media",
                                                                           "num_frames")}), strict=True)] == [True] * 2
    right = processor(prompts, images=[PROMPTS[3][1], PROMPTS[1][1]], padding_side="right")
    with pytest.raises(ValueError, match="generate needs left padding"):
        model.generate(**right, max_new_tokens=2)
    empty = dict(batch, attention_mask=batch["attention_mask"] * torch.tensor([[1], [0]]))
    with pytest.raises(ValueError, match="prompt 1 of the batch has no tokens"):
        model.generate(**empty, max_new_tokens=2)


def test_the_backbones_own_penalties_do_not_reach_flamingo_generation(make_model):
    """A backbone's generation config may ship penalties (Qwen2.5-Instruct: repetition_penalty 1.05): generate, the
    evaluation and the server then decoded different greedy tokens. Neutral unless a call asks for them."""
    from flamingo.model.generation import generation_config_for

    model, processor = make_model("llama", gates=0.8)
    prompt, media = PROMPTS[3]
    batch = processor(prompt, images=media)
    expected = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    model.lm.generation_config.repetition_penalty = 3.0
    model.lm.generation_config.no_repeat_ngram_size = 1
    config = generation_config_for(model)
    assert (config.repetition_penalty, config.no_repeat_ngram_size) == (1.0, 0)
    assert torch.equal(model.generate(**batch, max_new_tokens=6, min_new_tokens=6), expected)
    assert generation_config_for(model, repetition_penalty=1.2).repetition_penalty == 1.2


def test_a_callers_generation_config_overrides_only_what_it_sets(make_model, monkeypatch):
    """A caller's GenerationConfig reached transformers as it was, its unset fields filled from the bare LM's config:
    no stop at <|endofchunk|>, and a chat backbone's sampling and penalties applied. Its unset fields now keep
    Flamingo's defaults (generate(generation_config=GenerationConfig(**f)) == generate(**f)); the fields it sets
    (an EOS, a pad id, sampling, a penalty) are kept, and the caller's config is left as it was."""
    from transformers import GenerationConfig, LogitsProcessorList, SequenceBiasLogitsProcessor

    model, processor = make_model("llama", gates=1.0)
    batch = processor(*PROMPTS[1])
    t = batch["input_ids"].shape[1]
    eoc = model.config.end_of_chunk_token_id
    push = LogitsProcessorList([SequenceBiasLogitsProcessor({(eoc,): 1e4})])  # make <|endofchunk|> certain
    out = model.generate(**batch, generation_config=GenerationConfig(max_new_tokens=5), logits_processor=push)
    assert out[0, t:].tolist() == [eoc]

    backbone = model.lm.generation_config  # as a chat backbone ships it
    backbone.do_sample, backbone.temperature, backbone.repetition_penalty = True, 5.0, 3.0
    backbone.no_repeat_ngram_size = 1
    for fields in ({"max_new_tokens": 6, "min_new_tokens": 6}, {"max_new_tokens": 4, "num_beams": 2},
                   {"max_new_tokens": 6, "do_sample": True, "top_k": 5, "temperature": 0.7}):
        torch.manual_seed(0)
        expected = model.generate(**batch, **fields)
        for _ in range(2):  # greedy twice alike, sampling under the same seed
            torch.manual_seed(0)
            assert torch.equal(model.generate(**batch, generation_config=GenerationConfig(**fields)), expected), fields

    seen = []
    generate = model.lm.generate
    monkeypatch.setattr(model.lm, "generate", lambda **kw: seen.append(kw["generation_config"]) or generate(**kw))
    given = GenerationConfig(max_new_tokens=5, eos_token_id=[7], pad_token_id=9, do_sample=True,
                             repetition_penalty=1.3)
    out = model.generate(**batch, generation_config=given, logits_processor=push)
    (config,) = seen
    assert (config.eos_token_id, config.pad_token_id, config.do_sample, config.repetition_penalty) == ([7], 9, True,
                                                                                                     1.3)
    assert config.suppress_tokens == [model.config.media_token_id] and config.no_repeat_ngram_size == 0
    assert out[0, t:].tolist() == [eoc] * 5  # <|endofchunk|> is no EOS of this call
    assert given.suppress_tokens is None and given.eos_token_id == [7]


def test_the_backbones_own_decoding_mode_and_filters_do_not_reach_flamingo_generation(make_model):
    """An LM's generation_config.json with num_beams or a sampling filter (min_p, typical_p, epsilon/eta cutoffs)
    made a plain `generate` beam-search, or kept the filter while temperature/top-k/top-p were reset: greedy and
    unfiltered unless a call asks."""
    from flamingo.model.generation import generation_config_for

    model, processor = make_model("llama", gates=0.8)
    batch = processor(*PROMPTS[3])
    expected = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    shipped = {"num_beams": 4, "num_return_sequences": 2, "min_p": 0.5, "typical_p": 0.2, "epsilon_cutoff": 0.01,
               "eta_cutoff": 0.01}
    for name, value in shipped.items():
        setattr(model.lm.generation_config, name, value)
    config = generation_config_for(model)
    assert config.get_generation_mode().name == "GREEDY_SEARCH"
    assert all(getattr(config, name) in (1, 1.0, 0.0) for name in shipped), config
    assert torch.equal(model.generate(**batch, max_new_tokens=6, min_new_tokens=6), expected)
    assert generation_config_for(model, num_beams=2).num_beams == 2
