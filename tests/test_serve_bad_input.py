"""Bad input: each case gets a 4xx with an OpenAI-style error body that says what is wrong, and the server keeps
serving; a full queue answers 429 with Retry-After."""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
import threading
import zlib

import httpx
import pytest

from flamingo.serve.app import ServeSettings
from flamingo.serve.media import MediaPolicy
from flamingo.tiny import random_image

from serve_helpers import data_url, engine_for, running_server, save_tiny_model

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _png_claiming(width: int, height: int) -> str:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb's shape)."""
    buffer = io.BytesIO()
    random_image(0, size=1).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    png[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    png[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(png[ihdr - 4:ihdr + 13])))
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode()


def _video_url(width: int = 404, height: int = 2, seconds: int = 2) -> str:
    """An mp4 of one frame a second, `width` x `height` (by default over the 200:1 aspect bound, under the pixel
    limit)."""
    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(seconds):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 128, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()


def _user(*parts):
    content = [{"type": "image_url", "image_url": {"url": p}} if p.startswith(("data:", "/", ".", "http", "file"))
               or p.endswith(".png") else {"type": "text", "text": p} for p in parts]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("serve_bad")
    model_dir = save_tiny_model(root / "model")
    media = root / "media"
    media.mkdir()
    random_image(3).save(media / "ok.png")
    random_image(4).save(root / "secret.png")  # beside the media root, not in it
    engine = engine_for(model_dir, max_batch=4, prefill_chunk=32)
    settings = ServeSettings(model_name="tiny", api_key=KEY, max_body_bytes=64 * 1024, max_tokens_cap=32,
                             max_images=3, media=MediaPolicy(root=media, max_pixels=64 * 64, max_video_seconds=10))
    with running_server(engine, settings) as url:
        yield url


GOOD = _user(data_url(random_image(1)), "Output:")
QUICK = {"messages": [{"role": "user", "content": "Output:"}], "max_tokens": 1}  # the server still answers
CASES = {
    "malformed JSON": (dict(content=b'{"messages": [', headers={"content-type": "application/json"}), 400,
                       "not valid JSON"),
    "body not an object": (dict(json=[1, 2]), 400, "JSON object"),
    "wrong type": (dict(json={**GOOD, "max_tokens": "ten"}), 400, "max_tokens"),
    "wrong type (bool as int)": (dict(json={**GOOD, "n": True}), 400, "n"),
    "unknown field": (dict(json={**GOOD, "frobnicate": 1}), 400, "Unrecognized request argument supplied: frobnicate"),
    "bad content part": (dict(json={"messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 400,
                         "messages"),
    "too many images": (dict(json=_user(*[data_url(random_image(i)) for i in range(4)], "Output:")), 400,
                        "more than the 3"),
    "not an image": (dict(json=_user("data:image/png;base64," + base64.b64encode(b"hello, world").decode())), 400,
                     "not an image or video this server can decode"),
    "bad base64": (dict(json=_user("data:image/png;base64,@@@")), 400, "base64"),
    "not a media type": (dict(json=_user("data:text/plain;base64,aGk=")), 400, "unsupported media type"),
    "decompression bomb": (dict(json=_user(_png_claiming(50_000, 50_000))), 400, "decompression bomb"),
    "bomb under PIL's limit": (dict(json=_user(_png_claiming(5_000, 5_000))), 400, "5000x5000 is more than"),
    "over the pixel limit": (dict(json=_user(data_url(random_image(0, size=100)))), 400, "100x100"),
    "image too thin to resize": (dict(json=_user(data_url(random_image(0).resize((402, 2))))), 400, "aspect ratio"),
    "video too thin to resize": (dict(json={"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": _video_url()}}, {"type": "text", "text": "Output:"}]}],
        "max_tokens": 2}), 400, "aspect ratio"),
    "video too long": (dict(json={"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": _video_url(16, 16, seconds=12)}},
        {"type": "text", "text": "Output:"}]}], "max_tokens": 2}), 400, "more than the 10 s allowed"),
    "body too large": (dict(json=_user("x" * 70_000)), 413, "larger than the server's limit"),
    # OpenAI's wording, which clients that map errors by their text (litellm) know
    "prompt past the positions": (dict(json=_user("yes no " * 1500)), 400, "This model's maximum context length is"),
    "prompt + max_tokens past the positions": (dict(json={**_user("yes no " * 1020), "max_tokens": 32}), 400,
                                               "This model's maximum context length is"),
    "max_tokens over the cap": (dict(json={**GOOD, "max_tokens": 33}), 400, "max_tokens=33 is more than this "
                                                                              "server's cap of 32"),
    # the field the request set is named (OpenAI's current name, which the openai client sends)
    "max_completion_tokens over the cap": (dict(json={**GOOD, "max_completion_tokens": 33}), 400,
                                           "max_completion_tokens=33 is more than this server's cap of 32"),
    "n over the limit": (dict(json={**GOOD, "n": 17}), 400, "n"),
    "path outside the media root": (dict(json=_user("../secret.png")), 400, "outside the server's media root"),
    "absolute path outside the root": (dict(json=_user("/etc/hostname.png")), 400, "outside"),
    "missing local file": (dict(json=_user("nope.png")), 400, "no file"),
    "remote URL refused": (dict(json=_user("http://127.0.0.1:9/x.png")), 400, "remote media"),
    "last message not the user's": (dict(json={"messages": [{"role": "assistant", "content": "hi"}]}), 400,
                                    "last message"),
    "a placeholder in chat text": (dict(json=_user("<image>Output:")), 400, "may not contain <image>"),
    "raw prompt placeholder mismatch": (dict(json={"prompt": "<image><image>Output:",
                                                   "media": [data_url(random_image(1))]}, path="/v1/completions"),
                                        400, "placeholder"),
    "empty prompt": (dict(json={"prompt": "", "max_tokens": 2}, path="/v1/completions"), 400, "empty"),
    "empty chat": (dict(json={"messages": [{"role": "user", "content": []}]}), 400, "empty"),
    "penalty out of OpenAI's range": (dict(json={**GOOD, "presence_penalty": 2.5}), 400, "presence_penalty"),
    "logit_bias key of a digit int() refuses": (dict(json={**GOOD, "logit_bias": {"\u00b2": 5}}), 400,
                                                "not a token id"),
    "logprobs past the completions API's 5": (dict(json={"prompt": "Output:", "logprobs": 6}, path="/v1/completions"),
                                              400, "logprobs"),
    # JSON may escape half a character (a JavaScript string cut in an emoji): tokenizers fail on it
    "lone surrogate in chat": (dict(content=b'{"messages":[{"role":"user","content":"a\\ud800b"}]}'), 400,
                               "lone UTF-16 surrogate"),
    "lone surrogate in a completion": (dict(content=b'{"prompt":"a\\uDC00b","max_tokens":2}', path="/v1/completions"),
                                       400, "lone UTF-16 surrogate"),
    "lone surrogate in a response": (dict(content=b'{"input":"a\\ud83d","max_output_tokens":2}', path="/v1/responses"),
                                     400, "lone UTF-16 surrogate"),
    "lone surrogate to tokenize": (dict(content=b'{"prompt":"a\\ud800"}', path="/tokenize"), 400,
                                   "lone UTF-16 surrogate"),
    "surrogate bytes in chat": (dict(content=b'{"messages":[{"role":"user","content":"a\xed\xa0\x80b"}]}'), 400,
                                "lone UTF-16 surrogate"),
    # json.loads reads UTF-16 and UTF-32 bodies too, whose escapes are not the UTF-8 bytes searched for (a 500 after
    # the model ran, echoing the surrogate)
    "lone surrogate in a UTF-16 body": (dict(content='{"prompt":"a\\ud800b","max_tokens":2,"echo":true}'.encode(
        "utf-16"), path="/v1/completions"), 400, "lone UTF-16 surrogate"),
    "lone surrogate in a UTF-32 body": (dict(content='{"input":"a","metadata":{"k":"\\ud800"},"max_output_tokens":2}'
                                             .encode("utf-32-le"), path="/v1/responses"), 400, "lone UTF-16 surrogate"),
    "gzip-encoded body": (dict(content=gzip.compress(json.dumps(GOOD).encode()),
                               headers={"Content-Encoding": "gzip"}), 415, "Content-Encoding 'gzip' is not supported"),
    "JSON nested too deeply": (dict(content=b'{"messages":[{"role":"user","content":"x"}],"stop":' + b"[" * 3000
                                    + b"]" * 3000 + b"}"), 400, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(served, case):
    request, status, message = CASES[case]
    path = request.pop("path", "/v1/chat/completions") if "path" in request else "/v1/chat/completions"
    response = httpx.post(served + path, headers={**AUTH, **request.get("headers", {})}, timeout=30,
                          **{k: v for k, v in request.items() if k != "headers"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    ok = httpx.post(served + "/v1/chat/completions", json=QUICK, headers=AUTH, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_a_missing_or_wrong_api_key_is_refused(served, headers):
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics")):
        response = httpx.request(method, served + path, json=GOOD, headers=headers, timeout=30)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served + "/health", timeout=30).status_code == 200  # open: for load balancers


def test_head_checks_and_a_wrong_method_say_what_is_allowed(served):
    """A health check by HEAD (`wget --spider`, `curl -I`) got 405, so a healthy server read as down; and a 405 lost
    its `Allow` header (RFC 9110)."""
    for path in ("/health", "/"):
        response = httpx.head(served + path, timeout=30)
        assert response.status_code == 200 and response.content == b""
    wrong = httpx.get(served + "/v1/chat/completions", headers=AUTH, timeout=30)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


def test_unknown_route_is_an_openai_style_404(served):
    response = httpx.get(served + "/v1/nothing", headers=AUTH, timeout=30)
    assert response.status_code == 404 and "error" in response.json()


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    """Nothing runs the queue (the engine is not started): two requests wait, the third is turned away."""
    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=1, max_queue=2)
    with running_server(engine, ServeSettings(), start_engine=False) as url:
        waiting = [threading.Thread(target=_post_and_forget, args=(url,)) for _ in range(2)]
        for t in waiting:
            t.start()
        for _ in range(200):  # until both wait in the queue
            if len(engine._waiting) == 2:
                break
            threading.Event().wait(0.02)
        response = httpx.post(url + "/v1/chat/completions", json=GOOD, timeout=10)
        assert response.status_code == 429
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["type"] == "rate_limit_error"
        engine.stop(0.0)  # fails the waiting two (500), so that the server stops at once
    for t in waiting:
        t.join(timeout=30)


def _post_and_forget(url: str) -> None:
    try:
        httpx.post(url + "/v1/chat/completions", json=GOOD, timeout=3)
    except httpx.TransportError:
        pass


# valid values at the edges of their ranges (no 4xx: each is answered)
ODD = {"temperature near 0": {"temperature": 1e-300},
       "seed past 64 bits": {"temperature": 1.0, "seed": 2**70},
       "seed + choice past 64 bits": {"temperature": 1.0, "seed": 2**64 - 1, "n": 2}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("serve_odd") / "model")


@pytest.mark.parametrize("case", list(ODD))
def test_odd_sampling_values_are_answered_and_leave_a_neighbour_alone(model_dir, case, one_thread):
    """An odd request queued behind a greedy one, so that both join in one turn: it gets its answer (no NaN, no seed
    overflow failing the batch and stranding the request) and the neighbour gets its answer alone."""
    neighbour = {"messages": [{"role": "user", "content": "Output:"}], "max_tokens": 8, "temperature": 0}
    odd = {"messages": [{"role": "user", "content": "Question:"}], "max_tokens": 4, **ODD[case]}
    engine = engine_for(model_dir, max_batch=4)
    answers: dict[str, object] = {}

    def post(name: str, body: dict, url: str) -> None:
        try:
            answers[name] = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        except httpx.TransportError as e:  # a request the engine strands times out
            answers[name] = e

    with running_server(engine, ServeSettings(), start_engine=False) as url:
        threads = []
        for name, body in (("neighbour", neighbour), ("odd", odd)):
            threads.append(threading.Thread(target=post, args=(name, body, url)))
            threads[-1].start()
            for _ in range(200):  # queued in this order
                if len(engine._waiting) == len(threads):
                    break
                threading.Event().wait(0.02)
        engine.start()
        for t in threads:
            t.join(timeout=60)
        alone = httpx.post(url + "/v1/chat/completions", json=neighbour, timeout=30)
    for name in ("neighbour", "odd"):
        assert isinstance(answers[name], httpx.Response) and answers[name].status_code == 200, answers[name]
    assert len(answers["odd"].json()["choices"]) == ODD[case].get("n", 1)
    assert answers["neighbour"].json()["choices"] == alone.json()["choices"]


def test_a_surrogate_pair_is_one_character(served):
    """Only a lone surrogate is refused: an emoji escaped as its pair (as `json.dumps` writes it) is answered."""
    body = b'{"messages":[{"role":"user","content":"a\\ud83d\\ude00b"}],"max_tokens":1}'
    response = httpx.post(served + "/v1/chat/completions", content=body, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text


def _texts(body: dict) -> list:
    """The answer texts of a chat, completion or Responses body."""
    if "output" in body:
        return [part["text"] for item in body["output"] for part in item["content"]]
    return [c["message"]["content"] if "message" in c else c["text"] for c in body["choices"]]


def test_null_takes_the_default(served):
    """OpenAI types temperature, top_p, n, stream, echo, ... as nullable: null is the field's default, and a float
    field's error says number (not integer)."""
    chat = {"messages": [{"role": "user", "content": "Output:"}], "max_tokens": 3, "seed": 7}
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "stream_options": None, "user": None}
    for path, body, given in (("/v1/chat/completions", chat, nulls),
                              ("/v1/completions", {"prompt": "Output:", "max_tokens": 3, "seed": 7},
                               {**nulls, "echo": None}),
                              ("/v1/responses", {"input": "Output:", "max_output_tokens": 3},
                               {"temperature": 0, "top_p": None, "stream": None})):
        defaults = {k: v for k, v in given.items() if v is not None}
        with_nulls = httpx.post(served + path, json={**body, **given}, headers=AUTH, timeout=30)
        without = httpx.post(served + path, json={**body, **defaults}, headers=AUTH, timeout=30)
        assert with_nulls.status_code == 200, with_nulls.text
        assert _texts(with_nulls.json()) == _texts(without.json())
    refused = httpx.post(served + "/v1/chat/completions", json={**chat, "temperature": "hot"}, headers=AUTH, timeout=30)
    assert refused.status_code == 400 and "valid number" in refused.json()["error"]["message"]
    required = httpx.post(served + "/v1/chat/completions", json={"messages": None}, headers=AUTH, timeout=30)
    assert required.status_code == 400 and required.json()["error"]["param"] == "messages"


def test_a_developer_message_is_a_system_message(served):
    """OpenAI's newer chat role `developer` is the system message (as the Responses API takes it)."""
    def answer(role):
        body = {"messages": [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Output:"}],
                "max_tokens": 4, "temperature": 0}
        response = httpx.post(served + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    assert answer("developer") == answer("system")


@pytest.mark.parametrize("url, message", [("data:image/png;base64,@@@", "base64"),
                                          ("data:text/plain;base64,aGk=", "unsupported media type"),
                                          ("../secret.png", "outside"),
                                          ("data:image/png;base64," + base64.b64encode(b"hello").decode(),
                                           "not an image or video this server can decode"),
                                          (_video_url(16, 16, seconds=12), "more than the 10 s allowed")])
def test_media_errors_name_the_requests_field(served, url, message):
    """A medium's error names the field that holds it: chat `messages`, completions `media`, Responses `input`."""
    for path, body, field in (
            ("/v1/chat/completions", _user(url, "Output:"), "messages"),
            ("/v1/completions", {"prompt": "<image>Output:", "media": [url], "max_tokens": 2}, "media"),
            ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": url}]}],
                               "max_output_tokens": 2}, "input")):
        response = httpx.post(served + path, json=body, headers=AUTH, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert message in error["message"] and error["param"] == field, (path, error)


def _asgi_call(app, method: str, path: str, headers: dict, chunks: list) -> list:
    """Call the ASGI app as a server would for a client that sends `chunks` of its body, then goes away; the
    messages the app sent back."""
    import asyncio

    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_client_gone_while_its_body_is_read_is_no_server_error(model_dir, tmp_path):
    """A client that sends part of its body and disconnects (a request or a file upload) ends its request with 499:
    no server error, no traceback in the log (before: ClientDisconnect went up to the server as an ASGI error)."""
    from flamingo.serve.app import create_app

    app = create_app(engine_for(model_dir), ServeSettings(batch_dir=str(tmp_path / "batches")))
    sent = _asgi_call(app, "POST", "/v1/chat/completions", {"content-length": "1000"}, [b'{"messages": ['])
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    boundary = "b0undary"
    upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\n"
              f"Content-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n{{\"custom_id\"").encode()
    sent = _asgi_call(app, "POST", "/v1/files", {"content-type": f"multipart/form-data; boundary={boundary}",
                                                 "content-length": "100000"}, [upload])
    assert sent[0]["status"] == 499


def test_options_under_which_the_server_never_answers_are_refused_at_once(model_dir, tmp_path):
    """A queue, batch or prefill chunk under 1 is refused when the engine is built, before the model loads (the
    directory here does not exist: loading it would fail otherwise)."""
    from flamingo.serve.engine import Engine
    from flamingo.serve.server import build_engine

    for bad in ({"max_queue": 0}, {"max_batch": 0}, {"prefill_chunk": -1}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be >= 1"):
            build_engine(str(tmp_path / "no-model"), **bad)
    engine = engine_for(model_dir)
    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        Engine(engine.model, engine.processor, max_queue=0)


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>'
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # an ISO BMFF header, HEIC brand


@pytest.mark.parametrize("data, mime, says", [
    (b"", "image/png", "the file is empty (0 bytes)"),
    (b"", "video/mp4", "the file is empty (0 bytes)"),
    (SVG, "image/svg+xml", "SVG is a vector drawing"),
    (b"  <svg xmlns='http://www.w3.org/2000/svg'/>", "image/png", "SVG is a vector drawing"),
    (HEIC, "image/heic", "HEIC/HEIF needs a decoder"),
    (bytes(range(256)) * 4, "image/png", "it reads PNG, JPEG, WebP"),
])
def test_an_unreadable_file_is_named_plainly(data, mime, says):
    """Empty files, SVG, HEIC and random bytes: the error says what the file is and what the server reads, never a
    Python object (before: "cannot identify image file <_io.BytesIO object at 0x7f...>")."""
    from flamingo.serve.media import load_medium
    from flamingo.serve.protocol import APIError

    url = f"data:{mime};base64," + base64.b64encode(data).decode()
    with pytest.raises(APIError) as e:
        load_medium(url, MediaPolicy(), where="medium 0", param="messages")
    assert e.value.status == 400 and e.value.message.startswith(f"medium 0 ({mime}): "), e.value.message
    assert says in e.value.message and "0x" not in e.value.message and "object at" not in e.value.message
    if data and b"svg" not in data and b"ftyp" not in data:
        assert "not an image or video this server can decode" in e.value.message


def test_url_schemes_are_case_insensitive(served):
    """`DATA:` is a data URL and `HTTPS:` an https URL (RFC 3986: schemes are case-insensitive); before, `DATA:` was
    refused as "unsupported URL scheme 'data' (data:, ...)"."""
    def chat(url: str) -> httpx.Response:
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Output:"}]
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}
        return httpx.post(served + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)

    image = data_url(random_image(2))
    answers = []
    for url in (image, "DATA:" + image[5:], "Data:" + image[5:]):
        response = chat(url)
        assert response.status_code == 200, response.text
        answers.append(response.json()["choices"][0]["message"]["content"])
    assert answers[1:] == answers[:1] * 2
    refused = chat("HTTPS://127.0.0.1:9/x.png")
    assert refused.status_code == 400 and "remote media URLs are refused" in refused.json()["error"]["message"]


IMAGE = {"url": "data:image/png;base64,AAAA"}
BAD_PARTS = {  # a bad content part -> (the error's message, its param)
    "extra field in image_url": ([{"type": "image_url", "image_url": {**IMAGE, "foo": 1}}],
                                 "Unrecognized request argument supplied: messages.0.content.0.image_url.foo",
                                 "messages.0.content.0.image_url.foo"),
    "unknown part type": ([{"type": "text", "text": "a"}, {"type": "audio", "audio": "x"}],
                          "unknown type 'audio' (expected one of 'text', 'image_url', 'video_url')",
                          "messages.0.content.1"),
    "part without a type": ([{"text": "a"}], "the 'type' field is missing", "messages.0.content.0"),
    "image_url as a bare string": ([{"type": "image_url", "image_url": IMAGE["url"]}],
                                   "messages.0.content.0.image_url: Input should be a JSON object",
                                   "messages.0.content.0.image_url"),
    "detail not a string": ([{"type": "image_url", "image_url": {**IMAGE, "detail": 3}}],
                            "messages.0.content.0.image_url.detail: Input should be a valid string",
                            "messages.0.content.0.image_url.detail"),
    "text part without its text": ([{"type": "text"}], "messages.0.content.0.text: Field required",
                                   "messages.0.content.0.text"),
    "content neither text nor parts": (5, "messages.0.content: Input should be a valid string or a valid list",
                                       "messages.0.content"),
}


@pytest.mark.parametrize("case", list(BAD_PARTS))
def test_a_bad_content_part_is_told_what_is_wrong_with_it(served, case):
    """Before, every bad part read "messages.0.content: Input should be a valid string" (the error of the content's
    `str` branch, listed first)."""
    content, says, param = BAD_PARTS[case]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
    response = httpx.post(served + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["param"] == param, error


def test_a_bad_responses_part_is_told_what_is_wrong_with_it(served):
    for part, says in (({"type": "input_image", "image_url": IMAGE["url"], "foo": 1},
                        "Unrecognized request argument supplied: input.0.content.0.foo"),
                       ({"type": "input_audio"}, "unknown type 'input_audio'")):
        body = {"input": [{"role": "user", "content": [part]}], "max_output_tokens": 1}
        response = httpx.post(served + "/v1/responses", json=body, headers=AUTH, timeout=30)
        assert response.status_code == 400 and says in response.json()["error"]["message"], response.text
