"""The server's vision feature cache (`--vision-cache-mib`): a frame seen before skips the frozen tower (a prompt
list's shared image, a demonstration reused by the next query), the answers stay those of each prompt alone, and the
metrics count the frames."""

import httpx
import pytest

from flamingo.serve.app import ServeSettings
from flamingo.tiny import random_image

from serve_helpers import data_url, engine_for, greedy_alone, openai_client, running_server, save_tiny_model

QUESTION = "<image>Question: what is in the image? Short answer:"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("vision_cache_model"))


def _text(engine, tokens: list[int]) -> str:
    stopped = bool(tokens) and tokens[-1] in engine.eos
    return engine.processor.decode(tokens[:-1] if stopped else tokens)


@pytest.mark.parametrize("mib", [64, 0])
def test_frames_seen_before_skip_the_tower_and_answers_stay(model_dir, mib, one_thread):
    engine = engine_for(model_dir, max_batch=4, prefill_chunk=16, prefix_cache_mib=0, vision_cache_mib=mib)
    frames = []  # frames the tower ran on, per call
    engine.model.vision.register_forward_hook(lambda m, args, kwargs, out: frames.append(
        kwargs["pixel_values"].shape[0]), with_kwargs=True)
    image, demo, query = random_image(1), random_image(2), random_image(3)
    listed = [QUESTION + " a cat", QUESTION + " a dog", QUESTION + " two birds"]
    few_shot = QUESTION + " a cat.<|endofchunk|>" + QUESTION
    with running_server(engine, ServeSettings(model_name="tiny")) as url:
        client = openai_client(url)
        reply = client.completions.create(model="tiny", prompt=listed, max_tokens=4, temperature=0,
                                          extra_body={"media": [data_url(image)]})
        answers = [(p, [image], reply.choices[k].text) for k, p in enumerate(listed)]
        for q in (demo, query):  # the demonstration as the query first, then a new query image
            reply = client.completions.create(model="tiny", prompt=few_shot, max_tokens=4, temperature=0,
                                              extra_body={"media": [data_url(demo), data_url(q)]})
            answers.append((few_shot, [demo, q], reply.choices[0].text))
        metrics = httpx.get(url + "/metrics").text
    # the tower: 3 prompts on one image, then [demo, demo], then [demo, query]
    assert sum(frames) == (3 if mib else 3 + 2 + 2)
    if mib:
        assert "flamingo_vision_frames_total 7" in metrics and "flamingo_vision_frames_computed_total 3" in metrics
    else:
        assert "flamingo_vision_frames_total 7" not in metrics and engine.vision_cache is None
    for prompt, media, text in answers:  # each as `model.generate` gives it alone (no cache)
        assert text == _text(engine, greedy_alone(engine, prompt, media, 4)), prompt
