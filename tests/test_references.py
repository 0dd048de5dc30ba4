"""MMICL-style declared images and references: the processor's declarations, the extended masking rule, and a
reference's effect through forward, cached decoding (eager and compiled), beams and scoring."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from flamingo.model.xattn import compute_media_index
from flamingo.references import resolve_declarations
from flamingo.tiny import random_image

IMG, REF = 9, 20  # media token id, first reference token id (tests of the rule alone)
PROMPT = ("Image 0 is <image0>. A red circle.<|endofchunk|>Image 1 is <image1>. A blue star.<|endofchunk|>"
          "Question: what colour is the shape in <image0>? Answer:")


def test_declarations_become_placeholders_and_later_mentions_references():
    text = resolve_declarations("Image 0 is <image0>. Image 1 is <image1>. Is <image0> red?", 2, 4)
    assert text == "Image 0 is <image>. Image 1 is <image>. Is <image0> red?"
    errors = {"Image 0 is <image0>. Image 0 is <image0>.": "declared twice",
              "Is <image0> red? Image 0 is <image0>.": "before any `Image 0 is <image0>` declares it",
              "Image 1 is <image1>. Image 0 is <image0>.": "declare images in order",
              "Image 0 is <image0>. Image 1 is <image1>.": "declares image 1 but 1 image",
              "Image 0 is <image0>. Is <image5> red?": "reference tokens for images 0-3",
              "<image> Image 0 is <image0>.": "not <image>",
              "Image 0 is <image0>. Is <image00> red?": "<image00>: image indices have no leading zeros",
              "Image 00 is <image0>.": "declares image 00 with <image0>"}
    for text, message in errors.items():
        with pytest.raises(ValueError, match=message):
            resolve_declarations(text, 1, 4)
    with pytest.raises(ValueError, match="declares 1 image"):  # fewer declarations than media
        resolve_declarations("Image 0 is <image0>.", 2, 4)
    with pytest.raises(ValueError, match="the model has no image reference tokens"):  # not "images 0--1"
        resolve_declarations("Image 0 is <image0>.", 1, 0)
    # digits of other scripts are no image index (`\d` and int() read them): characters, as any unknown tag
    assert resolve_declarations("Image 0 is <image0>. Not <image\u0663> nor <image\uff11>.", 1, 4) == \
        "Image 0 is <image>. Not <image\u0663> nor <image\uff11>."


def test_masking_rule_follows_the_last_image_or_reference():
    ids = torch.tensor([[1, IMG, 2, IMG, 3, REF + 0, 4, REF + 1, 5, IMG, 6]])
    expected = [[0, 1, 1, 2, 2, 1, 1, 2, 2, 3, 3]]
    assert compute_media_index(ids, IMG, references=(REF, 4)).tolist() == expected
    # without reference tokens in the ids, the rule is today's (a cumulative count of images)
    plain = torch.tensor([[1, IMG, 2, IMG, 3]])
    assert compute_media_index(plain, IMG, references=(REF, 4)).tolist() == compute_media_index(plain, IMG).tolist()
    # a reference to an image the row has not seen changes nothing; text before any image still gets 0
    assert compute_media_index(torch.tensor([[REF + 1, 1, IMG, REF + 3, 2]]), IMG, references=(REF, 4)).tolist() \
        == [[0, 0, 1, 1, 1]]
    # continued calls carry the index and the count apart: after [IMG, IMG, REF+0], a new image is the third
    first = torch.tensor([[IMG, IMG, REF]])
    index = compute_media_index(first, IMG, references=(REF, 4))
    assert index.tolist() == [[1, 2, 1]]
    more = compute_media_index(torch.tensor([[7, IMG, 8]]), IMG, start=index[:, -1], references=(REF, 4),
                               start_count=torch.tensor([2]))
    assert more.tolist() == [[1, 3, 3]]


def test_packed_samples_refer_to_their_own_images():
    ids = torch.tensor([[IMG, 1, IMG, REF, 2, IMG, 3, REF, 4]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1]])
    # sample 1's <image0> is the row's third image
    assert compute_media_index(ids, IMG, document_ids=docs, references=(REF, 4)).tolist() == \
        [[1, 1, 2, 1, 1, 3, 3, 3, 3]]
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])  # sample 1 starts with text: 0 until its own image
    assert compute_media_index(ids, IMG, document_ids=docs, references=(REF, 4)).tolist() == \
        [[1, 1, 2, 1, 0, 3, 3, 3, 3]]


@pytest.fixture
def ref_model(make_model):
    model, processor = make_model("llama", num_image_references=4)
    processor.image_references = True
    return model, processor


def _batch(processor, prompt=PROMPT, images=(0, 1)):
    return processor(prompt, images=[random_image(i) for i in images])


def test_processor_encodes_declarations_as_images_and_references_as_their_tokens(ref_model):
    model, processor = ref_model
    ids = _batch(processor)["input_ids"][0].tolist()
    first, n = model.references
    assert (first, n) == (model.config.first_reference_token_id, 4)
    assert ids.count(model.config.media_token_id) == 2 and ids.count(first) == 1 and first + 1 not in ids
    assert first >= model.config.first_new_token_id  # reference rows are trained like the other added tokens
    assert first + n <= model.config.first_new_token_id + model.config.num_new_tokens


def test_a_reference_changes_what_follows_it_and_nothing_before(ref_model):
    model, processor = ref_model
    a = _batch(processor)
    b = _batch(processor, PROMPT.replace("shape in <image0>", "shape in <image1>"))
    ref = int((a["input_ids"][0] == model.references[0]).nonzero())
    with torch.no_grad():
        la, lb = model(**a).logits, model(**b).logits
    assert torch.equal(la[0, :ref], lb[0, :ref])
    assert not torch.allclose(la[0, ref:], lb[0, ref:])
    # swapping image 0 changes the tokens after the reference even where image 1 was the last image
    c = processor(PROMPT, images=[random_image(5), random_image(1)])
    with torch.no_grad():
        lc = model(**c).logits
    assert not torch.allclose(la[0, ref:], lc[0, ref:])


class Force(LogitsProcessor):
    """Forces token `token` at generation step `step` (greedy then picks it)."""

    def __init__(self, prompt_len: int, step: int, token: int) -> None:
        self.prompt_len, self.step, self.token = prompt_len, step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0.0
        return scores


def _uncached_logits(model, batch, sequence):
    """The logits a plain uncached forward gives at each generated position of `sequence (1, T + new)`."""
    with torch.no_grad():
        logits = model(sequence, images=batch["images"], num_media=batch["num_media"]).logits[0]
    t = batch["input_ids"].shape[1]
    return logits[t - 1:-1]  # (new, V)


def _generate_logits(model, batch, steps, **kwargs):
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)[0]  # (1, T + new), (new, V)


@pytest.mark.parametrize("target", [0, 1])
def test_a_generated_reference_retargets_the_next_steps_as_uncached_decoding_does(ref_model, target):
    model, processor = ref_model
    batch = _batch(processor, PROMPT.replace("shape in <image0>? Answer:", "last shape? Answer:"))
    t = batch["input_ids"].shape[1]
    token = model.references[0] + target
    sequence, cached = _generate_logits(model, batch, 6, logits_processor=LogitsProcessorList([Force(t, 2, token)]))
    assert sequence[0, t + 2] == token
    torch.testing.assert_close(cached, _uncached_logits(model, batch, sequence), atol=1e-4, rtol=1e-4)


def test_compiled_decoding_follows_a_generated_reference(ref_model):
    import torch._dynamo

    from flamingo.model.generation import compile_config

    model, processor = ref_model
    batch = _batch(processor, PROMPT.replace("shape in <image0>? Answer:", "last shape? Answer:"))
    t = batch["input_ids"].shape[1]
    force = LogitsProcessorList([Force(t, 1, model.references[0])])
    torch._dynamo.reset()
    eager, eager_logits = _generate_logits(model, batch, 6, logits_processor=force)
    compiled, compiled_logits = _generate_logits(model, batch, 6, logits_processor=force, compile=True,
                                                 compile_config=compile_config(backend="aot_eager"))
    assert compiled.tolist() == eager.tolist()
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eager_logits, _uncached_logits(model, batch, eager), atol=1e-4, rtol=1e-4)


def test_beam_search_never_generates_a_reference_and_scores_match_a_plain_forward(ref_model):
    from helpers import continuation_logprobs_reference

    model, processor = ref_model
    batch = _batch(processor)
    first, n = model.references
    beams = model.generate(**batch, num_beams=3, max_new_tokens=6)
    assert not any(first <= token < first + n for token in beams[0].tolist()[batch["input_ids"].shape[1]:])
    candidates = [[first, 5, 6], [first + 1, 7], [8, first, 9]]
    scores = model.score(batch["input_ids"], candidates, images=batch["images"])
    for c, s in zip(candidates, scores):
        expected = continuation_logprobs_reference(model, batch["input_ids"], c, images=batch["images"])
        assert float(s) == pytest.approx(expected, abs=1e-4)


def _forward_logprobs(model, batch, continuation):
    """Summed log-probs of `continuation` after the prompt from one uncached forward; a last `<image>` is only read."""
    head, last = list(continuation[:-1]), continuation[-1]
    ids = torch.cat([batch["input_ids"], torch.tensor([head], dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(ids, images=batch["images"], num_media=batch["num_media"]).logits[0].float()
    logprobs = logits[batch["input_ids"].shape[1] - 1:].log_softmax(-1)  # (len(continuation), V)
    return float(logprobs.gather(-1, torch.tensor([*head, last])[:, None]).sum())


def test_a_short_candidate_ending_in_an_image_or_reference_scores_as_alone(ref_model):
    """Candidates are right-padded to their chunk's longest: a shorter one's last token (`<image>` may end a
    candidate, so may a reference) is not fed on, so each score equals its own forward and `batch_size=1`."""
    model, processor = ref_model
    image, first = model.config.media_token_id, model.references[0]
    candidates = [[5, image], [5, 6, 7, 8], [6, first + 1], [first, 5, 6, 7], [image]]
    two = _batch(processor)  # two images: a fed `<image>` would ask for a third
    expected = torch.tensor([_forward_logprobs(model, two, c) for c in candidates])
    for rows in (64, 1):
        got = model.score(two["input_ids"], candidates, images=two["images"], batch_size=rows)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # in score_batch, with the two-image context left-padded behind a longer one-image context
    one = "Image 0 is <image0>. " + "A red circle with a thin black border. " * 4 + "<|endofchunk|>Answer:"
    both = processor([one, PROMPT], images=[[random_image(0)], [random_image(0), random_image(1)]],
                     padding_side="left")
    assert both["attention_mask"][1, 0] == 0
    scores = model.score_batch(both["input_ids"], [candidates[1:3], candidates], attention_mask=both["attention_mask"],
                               images=both["images"], num_media=both["num_media"])
    torch.testing.assert_close(scores[1], expected, atol=1e-4, rtol=1e-4)
    alone = _batch(processor, one, images=(0,))
    torch.testing.assert_close(scores[0], model.score(alone["input_ids"], candidates[1:3], images=alone["images"],
                                                      batch_size=1), atol=1e-4, rtol=1e-4)


def test_attending_to_every_earlier_image_decodes_as_uncached(make_model):
    """only_attend_last_image=False: decode steps keep every image's K/V, so cached decoding equals the forward."""
    model, processor = make_model("llama", only_attend_last_image=False)
    batch = processor("<image>A red circle.<|endofchunk|><image>A blue star.<|endofchunk|>Both are",
                      images=[random_image(0), random_image(1)])
    sequence, cached = _generate_logits(model, batch, 6)
    torch.testing.assert_close(cached, _uncached_logits(model, batch, sequence), atol=1e-4, rtol=1e-4)


def test_training_text_refers_to_its_samples_images_with_the_same_tokens(ref_model):
    """A training text (an interleaved document or a pair's caption) may carry `<imageK>`: the data layer tokenizes it
    to the reference token, which is labelled like text, and the forward's masking rule follows it."""
    import io

    from flamingo.data.sequence import IGNORE_INDEX, Example, collate, encode_example
    from flamingo.data.sources import bytes_ref

    model, processor = ref_model
    png = []
    for i in (0, 1):
        buffer = io.BytesIO()
        random_image(i).save(buffer, format="PNG")
        png.append(bytes_ref(buffer.getvalue(), f"{i}.png"))
    text = "<image>A red circle.<|endofchunk|><image>A blue star.<|endofchunk|>The shape in <image0> is red."
    encoded = encode_example(Example("doc", text, png), processor, max_tokens=None)
    first = model.references[0]
    at = encoded.input_ids.index(first)
    assert encoded.labels[at] == first != IGNORE_INDEX  # predicted like any text token
    batch = collate([encoded], processor)
    index = compute_media_index(batch["input_ids"], model.config.media_token_id, references=model.references)
    assert index[0, at - 1] == 2 and index[0, at:].tolist() == [1] * (index.shape[1] - at)
    with torch.no_grad():  # and the model trains on it like on any batch
        out = model(**{k: v for k, v in batch.items() if k not in ("keys", "truncated")})
    assert torch.isfinite(out.loss)


def test_a_pair_row_declares_several_images_and_bad_declarations_are_skipped(tmp_path, ref_model):
    """A pairs row with `images` and a declaring caption reads as the processor reads the same prompt; a row whose
    declarations do not match its images is skipped and counted as `bad_record`."""
    import json

    from flamingo.data.errors import SkipSample
    from flamingo.data.pairs import pair_example
    from flamingo.data.sequence import encode_example
    from flamingo.data.sources import RawRecord

    _, processor = ref_model
    for i in (0, 1):
        random_image(i).save(tmp_path / f"{i}.png")
    caption = "Image 0 is <image0>. Image 1 is <image1>. Question:What colour is the object in <image0>? Short answer:"
    row = {"images": ["0.png", "1.png"], "caption": caption + "red"}
    example = pair_example(RawRecord("r0", str(tmp_path / "multi.jsonl"), json.dumps(row)))
    assert [m.name for m in example.media] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    encoded = encode_example(example, processor, max_tokens=None)
    prompt_ids, _ = processor.encode_prompt(caption + "red<|endofchunk|>", [random_image(0), random_image(1)],
                                            image_references=True)
    assert encoded.input_ids == prompt_ids
    assert torch.equal(encoded.media[1], processor.preprocess_media(random_image(1)))
    for bad in ({"images": ["0.png"], "caption": caption},  # two declarations, one image
                {"images": ["0.png", "1.png"], "caption": "Is <image0> red? Image 0 is <image0>. Image 1 is <image1>."},
                {"images": [], "caption": caption}, {"images": "0.png", "caption": caption}):
        with pytest.raises(SkipSample) as info:
            pair_example(RawRecord("bad", str(tmp_path / "multi.jsonl"), json.dumps(bad)))
        assert info.value.reason == "bad_record"


def test_decoded_answers_keep_reference_tokens_and_drop_control_tokens(ref_model):
    """A generated `<image1>` names an image: `decode` / `batch_decode` (what `flamingo generate`, eval's predictions
    and the server print) keep it as text, while EOS, padding, `<image>` and `<|endofchunk|>` stay out, as the
    tokenizer's own skipping drops them."""
    model, processor = ref_model
    tok = processor.tokenizer
    first = model.references[0]
    red = tok.encode(" red", add_special_tokens=False)
    controls = [tok.pad_token_id, tok.eos_token_id, processor.media_token_id, model.config.end_of_chunk_token_id]
    ids = [*red, first + 1, *controls, *red, first]
    assert processor.decode(ids) == processor.decode(torch.tensor(ids)) == " red<image1> red<image0>"
    assert processor.decode(first + 1) == "<image1>" and processor.decode(tok.eos_token_id) == ""  # TextStreamer's call
    assert processor.batch_decode(torch.tensor([ids, ids])) == [" red<image1> red<image0>"] * 2
    assert processor.decode([*red, *controls, *red]) == tok.decode([*red, *controls, *red], skip_special_tokens=True)
    assert processor.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)


def test_a_declared_prompt_is_read_as_declared_without_the_processor_setting(ref_model):
    """A model trained on declared images (`flamingo train` saves no `image_references`) is sent the same prompts by
    `generate` and the server: a string prompt that places no <image> and declares its media can be read one way
    only. An explicit image_references=False, or a prompt that places an <image>, is read as written."""
    _, processor = ref_model
    images = [random_image(0), random_image(1)]
    declared = processor.encode_prompt(PROMPT, images)
    processor.image_references = False
    assert processor.encode_prompt(PROMPT, images)[0] == declared[0]
    with pytest.raises(ValueError, match=r"prompt has 0 <image> placeholder\(s\) but 2"):
        processor.encode_prompt(PROMPT, images, image_references=False)
    mixed = "<image>Image 1 is <image1>. " + PROMPT.split("<|endofchunk|>", 1)[1]
    with pytest.raises(ValueError, match=r"prompt has 1 <image> placeholder\(s\) but 2"):
        processor.encode_prompt(mixed, images)


def _unshown_in_rendering(fmt, turns) -> Optional[str]:
    """The first reference in the rendered prompt's non-answer text to an image the prompt has not placed before it,
    as `unshown_reference` words it; None if none (what `ChatFormat.unshown_reference` must agree with)."""
    from flamingo.config import MEDIA_TOKEN
    from flamingo.references import REFERENCE, unshown_reference

    text = ""
    for piece, answer in fmt.segments(turns):
        for ref in [] if answer else REFERENCE.finditer(piece):
            error = unshown_reference(ref.group(0), (text + piece[:ref.start()]).count(MEDIA_TOKEN), fmt.references)
            if error is not None:
                return error
        text += piece
    return None


def test_a_conversation_refers_to_the_images_its_prompt_places_before_each_reference():
    """`ChatFormat.unshown_reference` on random conversations in every format against the rendered prompt: a system
    or user turn's `<imagek>` (k < the model's references) names an image placed before it there (Otter and
    Multimodal-GPT write a question's images first); assistant text and tags without a token are not checked."""
    import random
    from dataclasses import replace

    from flamingo.chat import FLAMINGO, OTTER, IdeficsChat, MMGPTChat, Turn
    from flamingo.config import MEDIA_TOKEN

    rng = random.Random(0)
    fragments = ["a", "Q: ", " ", "\n", "<image0>", "<image1>", "<image2>", "<image5>", "<image01>", "x <image1> y"]
    refused = 0
    for fmt in (replace(f, references=3) for f in (FLAMINGO, OTTER, MMGPTChat(end_of_answer="</s>"), IdeficsChat())):
        for _ in range(400):
            turns = []
            for _ in range(rng.randint(1, 6)):
                role = rng.choice(["system", "user", "user", "user", "assistant"])
                pieces = [rng.choice(fragments) for _ in range(rng.randint(1, 3))]
                if role == "user":
                    for _ in range(rng.choice([0, 0, 1, 2])):
                        pieces.insert(rng.randint(0, len(pieces)), MEDIA_TOKEN)
                turns.append(Turn(role, tuple(pieces)))
            got, want = fmt.unshown_reference(turns), _unshown_in_rendering(fmt, turns)
            assert (got[1] if got else None) == want, (fmt.name, turns, fmt.render(turns), got)
            if got is not None:
                refused += 1
                assert turns[got[0]].role != "assistant" and got[1].split()[0] in "".join(turns[got[0]].pieces)
    assert 300 < refused < 1300  # both answers are common
    assert replace(FLAMINGO, references=0).unshown_reference([Turn("user", ("<image0>",))]) is None
