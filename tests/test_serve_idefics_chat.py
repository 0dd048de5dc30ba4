"""Chat with an IDEFICS model in its own dialogue format (docs/serve.md, "The template"): the prompt the server builds
from OpenAI messages is what transformers' `IdeficsProcessor` makes of the model card's dialogue, token for token;
the served answer is the converted model's greedy answer to it, stopping at `<end_of_utterance>`."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch
from transformers import IdeficsConfig, IdeficsForVisionText2Text
from transformers.models.idefics.processing_idefics import IdeficsProcessor

from flamingo.chat import BLANKS, FLAMINGO, IdeficsChat, chat_format_for
from flamingo.config import END_OF_UTTERANCE, IDEFICS_IMAGE_WRAPPER
from flamingo.convert import from_idefics
from flamingo.convert.idefics import idefics_image_processor
from flamingo.processing import FlamingoProcessor
from flamingo.runtime.compat import TRANSFORMERS, pil_image_processor
from flamingo.serve.app import ServeSettings
from flamingo.serve.engine import Engine
from flamingo.serve.protocol import APIError, ChatCompletionRequest, parse
from flamingo.serve.template import render_messages
from flamingo.tiny import random_image, tiny_tokenizer

from serve_helpers import data_url, greedy_alone, openai_client, running_server

IdeficsImageProcessorPil = pil_image_processor("IdeficsImageProcessor")
ANSWER = "This picture depicts Idefix, the dog of Obelix."
CARD = "User: What is in this image?<image><end_of_utterance>\nAssistant: " + ANSWER + "<end_of_utterance>\n" \
       "User:<image>And who is that?<end_of_utterance>\nAssistant:"


def _messages(*turns):
    return parse(ChatCompletionRequest, {"messages": list(turns)}).messages


def _image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def _card_turns(first="a", second="b"):
    """The dialogue of IDEFICS-instruct's model card as OpenAI messages (image URLs `first`, `second`)."""
    return [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"}, _image(first)]},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": [_image(second), {"type": "text", "text": "And who is that?"}]}]


def _tokenizer(end_of_utterance: bool = True):
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IDEFICS_IMAGE_WRAPPER, "<image>"]
                            + [END_OF_UTTERANCE] * end_of_utterance})
    tok.pad_token = tok.eos_token
    return tok


def test_the_instruct_dialogue_format():
    text, media = render_messages(IdeficsChat(), _messages(*_card_turns()))
    assert text == CARD
    assert [m.url for m in media] == ["a", "b"]
    text, _ = render_messages(IdeficsChat(), _messages({"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"}, {"role": "user", "content": " Bye"}))
    assert text == "Be brief.\nUser: Hi<end_of_utterance>\nUser: Bye<end_of_utterance>\nAssistant:"
    base, _ = render_messages(IdeficsChat(end_of_turn=""), _messages(*_card_turns()))  # base models: a line break
    assert base == CARD.replace(END_OF_UTTERANCE, "")


def test_the_template_follows_the_model():
    tok = _tokenizer()
    image_processor = IdeficsImageProcessorPil(image_size=32)
    processor = FlamingoProcessor(tok, image_processor, template="idefics")
    eou = tok.convert_tokens_to_ids(END_OF_UTTERANCE)
    assert chat_format_for(processor, eou + 1) == IdeficsChat()
    # a tokenizer whose token the model has no row for: turns without it, and message text may not hold it
    no_row = chat_format_for(processor, eou)
    assert no_row.end_of_turn == "" and END_OF_UTTERANCE in no_row.reserved
    base = chat_format_for(FlamingoProcessor(_tokenizer(False), image_processor, template="idefics"), 10**6)
    assert base.end_of_turn == "" and END_OF_UTTERANCE not in base.reserved and base.stops == ("\nUser:",)


@pytest.mark.parametrize("text", ["<end_of_utterance>", "a <fake_token_around_image> b", "<image>"])
def test_idefics_markers_in_message_text_are_refused(text):
    with pytest.raises(APIError, match="may not contain"):
        render_messages(IdeficsChat(), _messages({"role": "user", "content": text}))
    if text != "<image>":  # plain text to a Flamingo model
        render_messages(FLAMINGO, _messages({"role": "user", "content": text}))


@pytest.mark.skipif(TRANSFORMERS < (5, 0), reason="transformers 4's IdeficsProcessor (the peer) takes only a "
                    "LlamaTokenizerFast, and the tiny tokenizer is a PreTrainedTokenizerFast")
def test_a_chat_gives_the_ids_idefics_processor_gives_the_model_cards_dialogue():
    tok = _tokenizer()
    image_processor = IdeficsImageProcessorPil(image_size=32)
    images = [random_image(1), random_image(2)]
    card = ["User: What is in this image?", images[0], "<end_of_utterance>", "\nAssistant: " + ANSWER +
            "<end_of_utterance>", "\nUser:", images[1], "And who is that?<end_of_utterance>", "\nAssistant:"]
    theirs = IdeficsProcessor(image_processor, copy.deepcopy(tok))(text=[card], add_end_of_utterance_token=False,
                                                                   return_tensors="pt")
    processor = FlamingoProcessor(tok, idefics_image_processor(32), template="idefics")
    text, _ = render_messages(IdeficsChat(), _messages(*_card_turns()))
    mine = processor(text, images=images)
    assert mine["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert torch.allclose(mine["images"][:, :, 0], theirs["pixel_values"], atol=1e-6)


def _idefics_model():
    """A tiny IDEFICS-instruct (its tokenizer's three added tokens in the decoupled rows, gates open) converted."""
    tok = _tokenizer()
    config = IdeficsConfig(
        vocab_size=len(tok) - 3, additional_vocab_size=3, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, cross_layer_interval=1, use_resampler=True, pad_token_id=0, bos_token_id=0,
        eos_token_id=0, max_position_embeddings=256, initializer_range=0.5,
        vision_config=dict(embed_dim=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=4,
                              resampler_head_dim=8))
    torch.manual_seed(0)
    peer = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():
        for layer in peer.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.fill_(0.8)
            layer.alpha_dense.fill_(-0.6)
    return from_idefics(peer, tok, image_processor=idefics_image_processor(32))


def test_served_idefics_chat_is_its_greedy_answer_to_its_dialogue(one_thread):
    model, processor = _idefics_model()
    eou = processor.tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    assert model.config.end_of_chunk_token_id == eou  # answers stop at the end of the turn
    images = [random_image(3, size=32), random_image(4, size=32)]
    engine = Engine(model, processor, max_batch=4)
    with running_server(engine, ServeSettings(model_name="idefics")) as url:
        assert httpx.get(url + "/v1/models/idefics").json()["chat_template"] == "idefics"
        turns = _card_turns(data_url(images[0]), data_url(images[1]))
        out = openai_client(url).chat.completions.create(model="idefics", messages=turns, max_tokens=12,
                                                         temperature=0)
        counted = httpx.post(url + "/tokenize", json={"model": "idefics", "messages": turns}).json()["count"]
    tokens = greedy_alone(engine, CARD, images, 12)  # model.generate: stops at <end_of_utterance> (its EOS)
    stopped = bool(tokens) and tokens[-1] == eou
    text = processor.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True).lstrip(BLANKS)
    assert out.choices[0].message.content == text.split("\nUser:")[0]  # the chat's stop string, if it came
    if "\nUser:" not in text:
        assert out.usage.completion_tokens == len(tokens)
        assert out.choices[0].finish_reason == ("stop" if stopped else "length")
    ids = processor(CARD, images=images)["input_ids"][0]
    assert out.usage.prompt_tokens == counted == len(ids) and ids[0] == processor.tokenizer.bos_token_id
