"""A served model as the few-shot harness sees it: `flamingo eval --server URL` predicts through `flamingo serve` (or
any server of its API), the prompts, demos, metrics and records staying the harness's own.

The harness builds each prompt locally, as for a model in-process: its token ids come from the model's processor
(`--model DIR`: only the processor is loaded), the media go as data URLs. Generation tasks send `/v1/completions`
with those ids and greedy decoding (the server does not run beams: `--num-beams 1`); in chat prompts with all of the
chat format's stop strings as the request's `stop` (a format has one or two: within OpenAI's 4 and `flamingo serve`'s
`protocol.MAX_STOPS`, which tests/test_eval_remote.py checks), so the server stops there rather than generating the
rest of `max_tokens`, and the answer is cut at them here as well (a server may ignore `stop`), as in-process
(`Task.answer_text`). Ranked tasks send, per prompt, the list of its candidates' prompts (the prompt's ids
followed by the candidate's) with `echo`, `logprobs` and `max_tokens: 0`, and sum the candidate tokens'
log-probabilities: what `model.score_batch` sums in-process. Requests of a batch go out concurrently, so the server
batches them; a full queue (429) is waited out.
tests/test_eval_remote.py checks that predictions and metrics equal the in-process ones.
"""

from __future__ import annotations

import base64
import http.client
import json
import mimetypes
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from PIL import Image, UnidentifiedImageError

from ..detokenize import IncrementalText
from ..processing import VIDEO_EXTENSIONS, FlamingoProcessor
from ..runtime import LRU
from .predict import MediaLoader, continuation_ids_of
from .task import Sample, Task

CANDIDATES_PER_REQUEST = 16  # continuations scored per request (within a server's queue; its answer stays small)
BUSY_RETRIES = 30  # a busy server (429) is asked again after its Retry-After, this many times
# A transient failure (a reset or timed-out connection, a cut answer, a 5xx a restarting or draining server or a proxy
# gives) is asked again this many times, 1 s, 2 s, 4 s ... apart: every request is greedy decoding or scoring, the
# same answer whenever it is asked, and one dropped connection must not end an evaluation
TRANSIENT_RETRIES = 3
TRANSIENT_STATUS = (408, 500, 502, 503, 504)


def media_type(path: str) -> str:
    """The MIME type a medium file goes to the server under, so that the server reads it as the processor does: a
    video (the server decodes any `video/*` by its content) when its suffix is a video's or no image reader knows the
    file (MPEG-TS `.ts`, `.mts`, no suffix: the processor reads those as videos too), else an image."""
    guessed = mimetypes.guess_type(path)[0]
    if path.lower().endswith(VIDEO_EXTENSIONS):
        return "video/" + (guessed or "video/mp4").split("/", 1)[1]  # `.3gp` is audio/3gpp to mimetypes
    try:
        with Image.open(path):  # reads the header only
            pass
    except UnidentifiedImageError:
        return "video/octet-stream"
    except Exception:  # an image PIL knows but cannot read: the server says why
        pass
    return guessed if guessed and guessed.startswith("image/") else "image/png"


class ServerError(RuntimeError):
    """The server could not be reached or answered with an error (its message said): the run cannot go on, and the
    fault is the server's or its address's, not the harness's."""


def decoded_alone(processor: FlamingoProcessor, text: str) -> str:
    """A completion's text as a server sends it (its tokens decoded after a context token, `IncrementalText`: it
    continues the prompt) -> as `processor.batch_decode` writes the same tokens alone, as `predict.generate_batch`
    records them: a SentencePiece decoder drops the space a text's first word starts with (`▁yes` -> `yes`). Whether
    it does is read off the text's first token, tokenized again."""
    if not text[:1].isspace():
        return text
    first = processor.token_ids(text, special_tokens=False)[:1]
    served = IncrementalText(processor)
    for token in first:
        served.add(token)
    served.flush()
    alone = processor.decode(first)
    lost = len(served.text) - len(alone)
    return text[lost:] if lost > 0 and served.text.endswith(alone) and text.startswith(served.text[:lost]) else text


class RemoteModel:
    """Predictions from a server: `base_url` (e.g. http://127.0.0.1:8000), its API key, requests in flight at once."""

    def __init__(self, base_url: str, *, api_key: Optional[str] = None, concurrency: int = 8,
                 timeout: float = 600.0) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url, self.api_key, self.concurrency, self.timeout = base_url.rstrip("/"), api_key, concurrency, \
            timeout
        self._urls: LRU[str, str] = LRU(512)  # data URLs by path (demo images recur)
        self._model_card: Optional[dict[str, Any]] = None

    def __repr__(self) -> str:
        return f"RemoteModel({self.base_url!r})"

    def positions(self) -> Optional[int]:
        """The served LM's positions (`/v1/models`' `max_model_len`), None when the server does not say."""
        return self._card().get("max_model_len")

    def max_images(self) -> Optional[int]:
        """The most images or videos the server takes per prompt (`/v1/models`' `max_images`), None when it does not
        say."""
        value = self._card().get("max_images")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def _card(self) -> dict[str, Any]:
        if self._model_card is None:
            answer = self._request("/v1/models", None)
            models = answer.get("data") if isinstance(answer, dict) else None
            if not isinstance(models, list):
                raise ServerError(f"the server at {self.base_url} answered /v1/models with no model list: is it a "
                                  "`flamingo serve` or another OpenAI-compatible server?")
            self._model_card = models[0] if models and isinstance(models[0], dict) else {}
        return self._model_card

    # ------------------------------------------------------------------------------------------------ harness
    def generate_batch(self, processor: FlamingoProcessor, load: MediaLoader, task: Task,
                       prompts: Sequence[tuple[str, list[str]]], **generation: Any) -> list[dict[str, Any]]:
        """Greedy continuations -> [{"prediction", "raw"}], as `predict.generate_batch` (the text as its tokens decode
        alone, `decoded_alone`): in chat prompts the server stops at the chat format's stop strings, and every answer
        is cut at them here too."""
        settings = task.generation_settings(generation)
        if settings["num_beams"] != 1:
            raise ValueError(f"{task.name} decodes with {settings['num_beams']} beams; a server decodes greedily: "
                             "evaluate with --num-beams 1")
        stops = {"stop": list(task.chat.stops)} if task.chat is not None and task.chat.stops else {}
        bodies = [{"prompt": self._ids(processor, load, task, text, media), "media": self._media(media),
                   "max_tokens": int(settings["max_new_tokens"]), "temperature": 0, **stops} for text, media in prompts]
        texts = [decoded_alone(processor, reply["choices"][0]["text"])
                 for reply in self._post_all("/v1/completions", bodies)]
        return [{"prediction": task.prediction(t), "raw": task.answer_text(t)} for t in texts]

    def rank_batch(self, processor: FlamingoProcessor, load: MediaLoader, task: Task, samples: Sequence[Sample],
                   prompts: Sequence[tuple[str, list[str]]]) -> list[dict[str, Any]]:
        """Each candidate's summed log-probability after its prompt -> the task's records, as `predict.rank_batch`."""
        candidates = [task.candidates_for(sample) for sample in samples]
        scores = self.score_batch(processor, load, task, prompts, candidates)
        records = []
        for sample, cands, summed, (text, _) in zip(samples, candidates, scores, prompts):
            continuations = continuation_ids_of(processor, task, cands, text)  # cached by `score_batch`'s call
            records.append(task.from_scores(sample, cands, task.candidate_scores(summed, continuations)))
        return records

    def score_batch(self, processor: FlamingoProcessor, load: MediaLoader, task: Task,
                    prompts: Sequence[tuple[str, list[str]]], candidates: Sequence[Sequence[str]]
                    ) -> list[list[float]]:
        """Per prompt, each candidate continuation's summed token log-probability (`model.score_batch`'s values).
        One echo request per prompt (per `CANDIDATES_PER_REQUEST` candidates, fewer for a smaller server queue): a
        list of token-id prompts, the prompt's ids followed by each candidate's, with the prompt's media; the server
        prefills the first and takes the shared prompt from its prefix cache for the others."""
        per_request = min(CANDIDATES_PER_REQUEST, self._card().get("max_queue") or CANDIDATES_PER_REQUEST)
        bodies, owners = [], []
        for k, ((text, media), cands) in enumerate(zip(prompts, candidates)):
            ids, urls = self._ids(processor, load, task, text, media), self._media(media)
            continuations = continuation_ids_of(processor, task, cands, text)
            for start in range(0, len(continuations), per_request):
                group = continuations[start:start + per_request]
                bodies.append({"prompt": [ids + c for c in group], "media": urls, "max_tokens": 0, "echo": True,
                               "logprobs": 0, "temperature": 0})
                owners.append((k, group))
        out: list[list[float]] = [[] for _ in prompts]
        for reply, (k, group) in zip(self._post_all("/v1/completions", bodies), owners):
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            out[k] += [float(sum(c["logprobs"]["token_logprobs"][-len(cont):])) for c, cont in zip(choices, group)]
        return out

    # ------------------------------------------------------------------------------------------------ requests
    @staticmethod
    def _ids(processor: FlamingoProcessor, load: MediaLoader, task: Task, text: str, media: list[str]) -> list[int]:
        return processor.encode_prompt(text, [load(m) for m in media], image_references=task.image_references)[0]

    def _media(self, paths: list[str]) -> list[str]:
        return [self._data_url(p) for p in paths]

    def _data_url(self, path: str) -> str:
        url = self._urls.get(path)
        if url is None:
            with open(path, "rb") as f:
                url = f"data:{media_type(path)};base64," + base64.b64encode(f.read()).decode()
            self._urls.put(path, url)
        return url

    def _post_all(self, path: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(bodies)))) as pool:
            return list(pool.map(lambda body: self._post(path, body), bodies))

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request(path, body)

    def _request(self, path: str, body: Optional[dict[str, Any]]) -> dict[str, Any]:
        """POST `body` (GET when None) -> the decoded JSON answer; a ServerError saying why for an error answer or an
        unreachable server."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        busy = failed = 0
        while True:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (the user's)
                    text = response.read()
                break
            except urllib.error.HTTPError as e:
                if e.code == 429 and busy < BUSY_RETRIES:
                    busy += 1
                    time.sleep(float(e.headers.get("Retry-After") or 1))  # the server's queue is full: wait, ask again
                elif e.code in TRANSIENT_STATUS and failed < TRANSIENT_RETRIES:
                    e.close()
                    time.sleep(2 ** failed)
                    failed += 1
                else:
                    raise self._error(e) from None
            except urllib.error.URLError as e:  # no answer: refused, unresolved, or reset while it was sent
                if isinstance(e.reason, (ConnectionResetError, ConnectionAbortedError, TimeoutError)) and \
                        failed < TRANSIENT_RETRIES:
                    time.sleep(2 ** failed)
                    failed += 1
                    continue
                raise ServerError(f"cannot reach the server at {self.base_url}: {e.reason}") from None
            except (OSError, http.client.HTTPException) as e:  # a timeout, a reset or a cut answer while it was read
                if failed < TRANSIENT_RETRIES:
                    time.sleep(2 ** failed)
                    failed += 1
                    continue
                raise ServerError(f"no answer from the server at {self.base_url}{path} after {failed + 1} attempts: "
                                  f"{type(e).__name__}: {e}") from None
        try:
            return json.loads(text)
        except ValueError:
            raise ServerError(f"the server at {self.base_url} answered {path} with no JSON (is it a `flamingo serve` "
                              f"or another OpenAI-compatible server?): {text[:80]!r}") from None

    def _error(self, e: urllib.error.HTTPError) -> ServerError:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        return ServerError(f"the server at {self.base_url} answered {e.code}: {detail}")
