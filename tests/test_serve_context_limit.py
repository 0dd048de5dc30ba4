"""The server's context is the model's: the LM's positions, or the processor's `max_length` (a tokenizer's
`model_max_length`) where that is shorter, the limit `generate` and eval hold prompts to."""

from __future__ import annotations

import httpx
import pytest

from flamingo.model.backbones import lm_max_positions
from flamingo.serve.app import ServeSettings
from flamingo.serve.engine import Engine
from flamingo.tiny import tiny_flamingo

from serve_helpers import running_server


def test_a_max_length_shorter_than_the_positions_is_the_servers_limit(one_thread):
    model, processor = tiny_flamingo("gpt2", "clip", lm_overrides={"n_positions": 64})
    processor.max_length = 32  # as `from_backbones` sets it from a tokenizer's model_max_length of 32
    assert lm_max_positions(model.lm) == 64
    text = "a " * 40
    with pytest.raises(ValueError, match="longer than max_length=32"):
        processor(text)
    with running_server(Engine(model, processor), ServeSettings()) as url:
        assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["max_model_len"] == 32

        def complete(ids: list[int], max_tokens: int) -> httpx.Response:
            return httpx.post(url + "/v1/completions", timeout=60,
                              json={"prompt": ids, "max_tokens": max_tokens, "temperature": 0})

        assert complete([5] * 31, 1).status_code == 200
        for ids, max_tokens, param in (([5] * 40, 1, "prompt"), ([5] * 32, 1, "prompt"), ([5] * 20, 13, "max_tokens")):
            r = complete(ids, max_tokens)
            assert r.status_code == 400, (len(ids), max_tokens)
            error = r.json()["error"]
            assert error["code"] == "context_length_exceeded" and error["param"] == param
            assert error["message"].startswith("This model's maximum context length is 32 tokens")
