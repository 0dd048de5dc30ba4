"""`flamingo eval --server`: the harness's prompts predicted by `flamingo serve` give the predictions and metrics of
the same model in-process (generation greedy; ranking by the server's echoed log-probabilities); the subcommand
with --server; beams and RICES refused with a clear error; the server's window bounds the prompts."""

from __future__ import annotations

import argparse
import json
import urllib.error

import pytest
import torch

from flamingo import load_pretrained
from flamingo.eval import evaluate
from flamingo.eval.cli import add_eval_subcommand
from flamingo.eval.remote import RemoteModel, media_type
from flamingo.processing import FlamingoProcessor
from flamingo.serve.app import ServeSettings

from helpers import DATASET_MAKERS
from serve_helpers import engine_for, running_server, save_tiny_model

COMMON = dict(shots=[0, 2], trials=2, batch_size=3, progress=False, cider_tokenizer="python", vision_cache_mb=0,
              generation={"max_new_tokens": 4, "num_beams": 1})


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("eval_remote") / "model")
    with running_server(engine_for(model_dir, max_batch=8, prefill_chunk=32), ServeSettings()) as url:
        yield str(model_dir), url


def _records(out, task):
    return {p.name: [json.loads(line) for line in p.open()] for p in sorted((out / "predictions").iterdir())}


@pytest.mark.parametrize("task", ["vqa", "classification", "videoqa", "captioning"])
def test_predictions_and_metrics_through_the_server_equal_in_process(served, task, tmp_path):
    model_dir, url = served
    data = DATASET_MAKERS[task](tmp_path / "data")
    model, processor = load_pretrained(model_dir)
    local = evaluate(model, processor, task, str(data), out_dir=str(tmp_path / "local"), model_name="tiny", **COMMON)
    remote = evaluate(RemoteModel(url, concurrency=4), FlamingoProcessor.from_pretrained(model_dir), task, str(data),
                      out_dir=str(tmp_path / "remote"), model_name="tiny", **COMMON)
    for a, b in zip(local["runs"], remote["runs"], strict=True):
        assert b["metrics"] == pytest.approx(a["metrics"]) and b["skipped"] == a["skipped"]
    by_local, by_remote = _records(tmp_path / "local", task), _records(tmp_path / "remote", task)
    assert by_local.keys() == by_remote.keys()
    assert any(r.get("prediction") for records in by_local.values() for r in records)  # something to compare
    assert by_remote == by_local  # every record: prediction, raw text or top-5 ranking, demos


def test_chat_requests_carry_the_formats_stop_strings_and_predictions_equal_in_process(served, tmp_path,
                                                                                       monkeypatch):
    """With chat prompts each completion request carries all of the chat format's stop strings (five here: more than
    OpenAI's 4, within the server's MAX_STOPS), the server stops at each of them, and the prediction files equal the
    in-process ones: cut at every stop string. Every chat format's stop strings fit in a request."""
    import dataclasses

    import flamingo.eval.runner as runner
    from flamingo.chat import FLAMINGO, ChatFormat, IdeficsChat, MMGPTChat, OtterChat
    from flamingo.serve.protocol import MAX_STOPS

    assert all(len(fmt.stops) <= 4 for fmt in (ChatFormat, IdeficsChat, MMGPTChat, OtterChat))  # OpenAI's limit too

    model_dir, url = served
    data = DATASET_MAKERS["vqa"](tmp_path / "data")
    model, processor = load_pretrained(model_dir)
    common = {**COMMON, "trials": 1, "chat": True, "model_name": "tiny"}
    evaluate(model, processor, "vqa", str(data), out_dir=str(tmp_path / "uncut"), **common)  # no stop strings
    uncut = [r["raw"] for records in _records(tmp_path / "uncut", "vqa").values() for r in records]
    # stop strings inside the tiny model's answers: a letter after an answer's first character, and another from an
    # answer without the first (the fifth stop string: past OpenAI's limit of 4, the server stops there too)
    inner = [[c for c in raw[1:] if c.isascii() and c.isalpha()] for raw in uncut]
    first = next(letters[0] for letters in inner if letters)
    fifth = next(c for raw, letters in zip(uncut, inner) if first not in raw for c in letters)
    fmt = dataclasses.replace(FLAMINGO, stops=(first, "@@never1", "@@never2", "@@never3", fifth))
    monkeypatch.setattr(runner, "chat_format_for", lambda processor, vocab=None: fmt)
    exchanges = []

    class Recording(RemoteModel):  # the requests and the server's answers
        def _post(self, path, body):
            reply = super()._post(path, body)
            exchanges.append((body, reply["choices"][0]))
            return reply

    local = evaluate(model, processor, "vqa", str(data), out_dir=str(tmp_path / "local"), **common)
    remote = evaluate(Recording(url, concurrency=4), FlamingoProcessor.from_pretrained(model_dir), "vqa", str(data),
                      out_dir=str(tmp_path / "remote"), **common)
    for a, b in zip(local["runs"], remote["runs"], strict=True):
        assert b["metrics"] == pytest.approx(a["metrics"])
    assert _records(tmp_path / "remote", "vqa") == _records(tmp_path / "local", "vqa")
    assert len(fmt.stops) <= MAX_STOPS and len(exchanges) == len(uncut)
    assert all(body["stop"] == [first, "@@never1", "@@never2", "@@never3", fifth] for body, _ in exchanges)
    # the server stopped at the first stop string and at the fifth (an uncut answer without the first holds it)
    assert all(first not in choice["text"] and fifth not in choice["text"] for _, choice in exchanges)
    records = [r for records in _records(tmp_path / "local", "vqa").values() for r in records]
    assert [r["raw"] for r in records] == [raw.split(first)[0].split(fifth)[0] for raw in uncut]


def test_videos_under_other_names_reach_the_server_as_videos(served, tmp_path):
    """A video task's clips named `.ts` or without a suffix (the processor reads them as videos, by what they hold)
    go to the server as `video/*`, which it decodes by content: the in-process predictions, not a 400 that stops the
    run."""
    model_dir, url = served
    data = DATASET_MAKERS["videoqa"](tmp_path / "data")
    renamed = 0
    for split in ("train", "test"):
        path = data / f"{split}_qa.json"
        rows = json.loads(path.read_text())
        for row in rows:
            old = row.pop("video", None) or f"videos/{row.pop('video_id')}.mp4"
            row["video"] = old.removesuffix(".mp4") + ("" if renamed % 2 else ".ts")
            (data / old).rename(data / row["video"])
            renamed += 1
        path.write_text(json.dumps(rows))
    assert media_type(str(data / "videos" / "10")) == media_type(str(data / "videos" / "0.ts")) == "video/octet-stream"
    model, processor = load_pretrained(model_dir)
    local = evaluate(model, processor, "videoqa", str(data), out_dir=str(tmp_path / "local"), model_name="tiny",
                     **COMMON)
    remote = evaluate(RemoteModel(url, concurrency=4), FlamingoProcessor.from_pretrained(model_dir), "videoqa",
                      str(data), out_dir=str(tmp_path / "remote"), model_name="tiny", **COMMON)
    assert [run["skipped"] for run in remote["runs"]] == [run["skipped"] for run in local["runs"]]
    by_local = _records(tmp_path / "local", "videoqa")
    assert any(r.get("prediction") for records in by_local.values() for r in records)  # something to compare
    assert _records(tmp_path / "remote", "videoqa") == by_local


def test_eval_subcommand_with_server(served, tmp_path, capsys):
    model_dir, url = served
    data = DATASET_MAKERS["vqa"](tmp_path / "data")
    parser = argparse.ArgumentParser()
    add_eval_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", model_dir, "--server", url, "--task", "vqa", "--data", str(data),
                              "--shots", "0", "--trials", "1", "--num-beams", "1", "--max-new-tokens", "3",
                              "--out", str(tmp_path / "out"), "--no-progress"])
    assert args.func(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["generation"]["num_beams"] == 1 and results["runs"][0]["metrics"]


def test_eval_subcommand_with_server_and_a_foreign_checkpoint(tmp_path, one_thread):
    """`--model` an IDEFICS directory, served converted in memory: the harness prompts with its processor, read from
    a copy of the directory without its weights, and writes the predictions and metrics of the in-process run."""
    import shutil

    from test_idefics_equal import _peer

    from flamingo.cli import main
    from flamingo.serve.server import build_engine

    source = tmp_path / "idefics"
    peer, tok = _peer("vector", True)
    peer.save_pretrained(source)
    tok.save_pretrained(source)
    bare = shutil.copytree(source, tmp_path / "bare", ignore=shutil.ignore_patterns("*.safetensors"))
    data = DATASET_MAKERS["vqa"](tmp_path / "data")
    common = ["eval", "--task", "vqa", "--data", str(data), "--shots", "0", "1", "--trials", "1", "--num-beams", "1",
              "--max-new-tokens", "3", "--batch-size", "3", "--vision-cache-mb", "0", "--no-progress"]
    assert main([*common, "--model", str(source), "--out", str(tmp_path / "local")]) == 0
    with running_server(build_engine(str(source), max_batch=8, prefill_chunk=32), ServeSettings()) as url:
        assert main([*common, "--model", str(bare), "--server", url, "--out", str(tmp_path / "remote")]) == 0
    local, remote = _records(tmp_path / "local", "vqa"), _records(tmp_path / "remote", "vqa")
    assert any(r.get("prediction") for records in local.values() for r in records)  # something to compare
    assert remote == local
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("local", "remote")]
    local_summary, remote_summary = ([(r["shots"], r["values"], r["skipped"]) for r in run["summary"]]
                                     for run in results)
    assert remote_summary == local_summary and [skipped for _, _, skipped in local_summary] == [[0], [0]]


def test_beams_rices_and_a_missing_server_are_clear_errors(served, tmp_path):
    model_dir, url = served
    data = DATASET_MAKERS["vqa"](tmp_path / "data")
    processor = FlamingoProcessor.from_pretrained(model_dir)
    quick = dict(shots=[0], trials=1, progress=False)
    with pytest.raises(ValueError, match="--num-beams 1"):  # VQA's default is 3 beams
        evaluate(RemoteModel(url), processor, "vqa", str(data), **quick)
    with pytest.raises(ValueError, match="RICES"):
        evaluate(RemoteModel(url), processor, "vqa", str(data), demos="rices", **quick)
    with pytest.raises(RuntimeError, match="cannot reach the server"):
        evaluate(RemoteModel("http://127.0.0.1:9"), processor, "vqa", str(data), **quick)


def test_the_servers_window_bounds_the_prompts(served, tmp_path):
    """The harness skips (and counts) a query longer than the served LM's positions, as in-process: it takes them
    from the server's `/v1/models`."""
    model_dir, url = served
    data = DATASET_MAKERS["classification"](tmp_path / "data")
    processor = FlamingoProcessor.from_pretrained(model_dir)
    processor.max_length = None
    evaluate(RemoteModel(url), processor, "classification", str(data), shots=[0], trials=1, progress=False)
    assert processor.max_length == RemoteModel(url).positions() == load_pretrained(model_dir)[1].max_length


def test_candidate_scores_equal_score_batch(served, tmp_path):
    """The server's summed log-probabilities of every candidate after its prompt equal `model.score_batch`'s."""
    from flamingo.eval.demos import DemoSelector
    from flamingo.eval.predict import MediaLoader, _left_padded_inputs, build_prompt, continuation_ids_of
    from flamingo.eval.tasks import get_task

    model_dir, url = served
    data = DATASET_MAKERS["classification"](tmp_path / "data")
    model, processor = load_pretrained(model_dir)
    task = get_task("classification")
    samples, pool = task.load(str(data), "test"), task.load(str(data), "train")
    demos = DemoSelector(pool, "random", None, 0, None)
    prompts = [build_prompt(task, s, demos.select(s, i, 2)) for i, s in enumerate(samples)]
    candidates = [["dog", "cat", "red bird", "blue fish"]] * len(samples)  # several tokens and one
    loader = MediaLoader(processor)
    by_server = RemoteModel(url).score_batch(processor, loader, task, prompts, candidates)
    inputs = _left_padded_inputs(model, processor, loader, prompts)
    in_process = model.score_batch(inputs.pop("input_ids"), [continuation_ids_of(processor, task, c, text)
                                                             for c, (text, _) in zip(candidates, prompts)], **inputs)
    for remote, local in zip(by_server, in_process, strict=True):
        assert remote == pytest.approx(local.tolist(), abs=5e-3)
    assert len({round(v, 3) for v in by_server[0]}) == 4  # distinct scores: the comparison can tell them apart


def test_a_busy_server_is_waited_for_and_long_candidate_lists_are_split(tmp_path, one_thread):
    """Against a server whose queue holds 3 requests: candidate lists go in groups of 3, and the requests the full
    queue refuses (429) are sent again after its Retry-After; the scores are those of a roomy server."""
    from flamingo.eval.demos import DemoSelector
    from flamingo.eval.predict import MediaLoader, build_prompt
    from flamingo.eval.tasks import get_task

    model_dir = save_tiny_model(tmp_path / "model")
    data = DATASET_MAKERS["classification"](tmp_path / "data")
    processor = FlamingoProcessor.from_pretrained(str(model_dir))
    task = get_task("classification")
    samples = task.load(str(data), "test")  # 6 requests (12 rows) at once: more than the queue and batch hold
    demos = DemoSelector(task.load(str(data), "train"), "random", None, 0, None)
    prompts = [build_prompt(task, s, demos.select(s, i, 1)) for i, s in enumerate(samples)]
    candidates = [["dog", "cat", "red bird", "blue fish"]] * len(samples)
    scores = {}
    for queue in (64, 3):
        engine = engine_for(model_dir, max_batch=4, prefill_chunk=32, max_queue=queue)
        with running_server(engine, ServeSettings()) as url:
            remote = RemoteModel(url, concurrency=8)
            scores[queue] = remote.score_batch(processor, MediaLoader(processor), task, prompts, candidates)
            refused = engine.metrics.value("requests_total", {"endpoint": "/v1/completions", "status": "429"})
        if queue == 3:
            assert refused > 0  # the queue was full at least once, and the client waited
    for busy, roomy in zip(scores[3], scores[64], strict=True):
        assert busy == pytest.approx(roomy, abs=5e-3)


def test_a_gif_reaches_the_server_as_the_video_it_is_in_process(tmp_path):
    """An animated `.gif` query image is a video to the processor (its frames at 1 FPS); sent to a server as
    `image/gif`, it is decoded to the same frames."""
    from PIL import Image

    from flamingo.serve.media import MediaPolicy, load_medium
    from flamingo.tiny import random_image, tiny_flamingo

    frames = [random_image(i) for i in range(3)]
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=1000, loop=0)
    _, processor = tiny_flamingo()
    url = RemoteModel("http://127.0.0.1:9")._data_url(str(path))
    assert url.startswith("data:image/gif;base64,")
    served = load_medium(url, MediaPolicy(root=None), fps=processor.video_fps, max_frames=processor.max_frames)
    assert isinstance(served, list) and len(served) == 3 and all(isinstance(f, Image.Image) for f in served)
    assert torch.equal(processor.preprocess_media(served), processor.preprocess_media(str(path)))


def test_ranked_requests_carry_each_candidate_as_the_prompt_with_its_answer_tokenizes(tmp_path, monkeypatch):
    """The server scores the ids in-process scoring scores (`continuation_ids_of` on the prompt's text): with a
    LLaMA-1-era tokenizer (word-start `▁` before every text run), each candidate's prompt is the token ids of the
    prompt with that answer written out, not the prompt's ids followed by the answer tokenized alone."""
    from test_tokenizer_legacy import _llama_dir

    from flamingo.build import flamingo_processor
    from flamingo.eval.predict import MediaLoader, build_prompt
    from flamingo.eval.tasks import get_task
    from flamingo.tiny import tiny_image_processor

    processor, _ = flamingo_processor(str(_llama_dir(tmp_path / "lm", "absent")), tiny_image_processor(),
                                      max_frames=1, max_positions=None)
    task = get_task("hateful_memes")
    samples = task.load(str(DATASET_MAKERS["hateful_memes"](tmp_path / "data")), "test")[:2]
    prompts = [build_prompt(task, s, []) for s in samples]
    sent = []

    def answer(self, path, bodies):  # what a server answers: a log-probability of 0 per token
        sent.extend(bodies)
        return [{"choices": [{"index": j, "logprobs": {"token_logprobs": [0.0] * len(ids)}}
                             for j, ids in enumerate(body["prompt"])]} for body in bodies]

    monkeypatch.setattr(RemoteModel, "_post_all", answer)
    monkeypatch.setattr(RemoteModel, "_card", lambda self: {})
    RemoteModel("http://127.0.0.1:1").score_batch(processor, MediaLoader(processor), task, prompts,
                                                  [["yes", "no"]] * 2)
    assert [body["prompt"] for body in sent] == [[processor.prompt_ids(text + task.continuation(c))
                                                  for c in ("yes", "no")] for text, _ in prompts]


class _Flaky:
    """An HTTP server whose answers to POSTs follow `script` ("reset": the connection dropped; a status: an empty
    error answer; "ok": a JSON answer), then "ok"."""

    def __init__(self, script: list):
        import http.server
        import socket
        import struct
        import threading

        self.script, self.posts = list(script), 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the base class's name)
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts += 1
                step = outer.script.pop(0) if outer.script else "ok"
                if step == "reset":  # as a restarting load balancer: RST, no answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                body = b'{"ok": true}' if step == "ok" else b""
                self.send_response(200 if step == "ok" else step)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.mark.parametrize("script", [["reset"], [503, 502], ["reset", 500, 504]])
def test_a_dropped_connection_or_a_5xx_is_asked_again(script, monkeypatch):
    """Every request is greedy decoding or scoring (the same answer whenever asked): a reset, a cut answer or the
    5xx of a restarting or draining server is asked again a few times, 1 s, 2 s, ... apart, before the evaluation
    ends (one dropped connection ended a whole run, keeping nothing)."""
    import flamingo.eval.remote as remote

    waits: list[float] = []
    monkeypatch.setattr(remote.time, "sleep", waits.append)
    server = _Flaky(script)
    try:
        assert RemoteModel(server.url)._request("/v1/completions", {"prompt": "x"}) == {"ok": True}
        assert server.posts == len(script) + 1 and waits == [1, 2, 4][:len(script)]
        server.script, server.posts = ["reset", 503, "reset", 502], 0
        with pytest.raises(RuntimeError, match="answered 502"):
            RemoteModel(server.url)._request("/v1/completions", {"prompt": "x"})
        assert server.posts == 4
        sent = remote.urllib.request.urlopen  # a reset while the request is sent comes as a URLError
        resets = [urllib.error.URLError(ConnectionResetError(104, "Connection reset by peer"))]
        monkeypatch.setattr(remote.urllib.request, "urlopen",
                            lambda *a, **k: (_ for _ in ()).throw(resets.pop()) if resets else sent(*a, **k))
        server.script, server.posts = [], 0
        assert RemoteModel(server.url)._request("/v1/completions", {"prompt": "x"}) == {"ok": True}
        assert server.posts == 1 and not resets
        monkeypatch.setattr(remote.urllib.request, "urlopen", sent)
        server.script, server.posts = [400], 0  # the request itself is wrong: asked once
        with pytest.raises(RuntimeError, match="answered 400"):
            RemoteModel(server.url)._request("/v1/completions", {"prompt": "x"})
        assert server.posts == 1
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def test_prompts_past_the_servers_max_images_are_skipped_and_counted(tmp_path, one_thread):
    """`--shots 0 4 8 32` against a server taking 32 images per prompt: the 32-shot prompts hold 33, and the first
    one's 400 ended the run after the other shot counts had run, writing nothing. They are skipped and counted."""
    model_dir = save_tiny_model(tmp_path / "model")
    data = DATASET_MAKERS["vqa"](tmp_path / "data")
    processor = FlamingoProcessor.from_pretrained(str(model_dir))
    with running_server(engine_for(model_dir, max_batch=4, prefill_chunk=32), ServeSettings(max_images=2)) as url:
        results = evaluate(RemoteModel(url), processor, "vqa", str(data), shots=[0, 1, 2], trials=1, progress=False,
                           generation={"max_new_tokens": 2, "num_beams": 1}, out_dir=str(tmp_path / "out"))
    runs = {run["shots"]: run for run in results["runs"]}
    assert runs[0]["skipped"] == runs[1]["skipped"] == 0  # 1 and 2 images: within the server's 2
    assert runs[2]["skipped"] == runs[2]["num_samples"] > 0 and runs[2]["metrics"] == {}
    assert runs[2]["skipped_by"] == {"too_many_media": runs[2]["num_samples"]}
    records = (tmp_path / "out" / "predictions" / "vqa_2shot_trial0.jsonl").read_text().splitlines()
    assert json.loads(records[0])["skipped"] == "3 images/videos, the server takes 2"
