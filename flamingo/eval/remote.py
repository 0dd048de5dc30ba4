"""A served model as the few-shot harness sees it: `flamingo eval --server URL` predicts through `flamingo serve` (or
any server of its API), the prompts, demos, metrics and records staying the harness's own.

The harness builds each prompt locally, as for a model in-process: its token ids come from the model's processor
(`--model DIR`: only the processor is loaded), the media go as data URLs. Generation tasks send
`/v1/completions` with those ids and greedy decoding (the server does not run beams: `--num-beams 1`); ranked tasks
send, per candidate, the prompt's ids followed by the candidate's with `echo`, `logprobs` and `max_tokens: 0`, and sum
the candidate tokens' log-probabilities: what `model.score_batch` sums in-process. Requests of a batch go out
concurrently, so the server batches them. tests/test_eval_remote.py checks that predictions and metrics equal the
in-process ones.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from ..processing import VIDEO_EXTENSIONS, FlamingoProcessor
from ..runtime import LRU
from .predict import MediaLoader, continuation_ids_of
from .task import Sample, Task


class RemoteModel:
    """Predictions from a server: `base_url` (e.g. http://127.0.0.1:8000), its API key, requests in flight at once."""

    def __init__(self, base_url: str, *, api_key: Optional[str] = None, concurrency: int = 8,
                 timeout: float = 600.0) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url, self.api_key, self.concurrency, self.timeout = base_url.rstrip("/"), api_key, concurrency, \
            timeout
        self._urls: LRU[str, str] = LRU(512)  # data URLs by path (demo images recur)

    def __repr__(self) -> str:
        return f"RemoteModel({self.base_url!r})"

    def positions(self) -> Optional[int]:
        """The served LM's positions (`/v1/models`' `max_model_len`), None when the server does not say."""
        models = self._request("/v1/models", None)["data"]
        return models[0].get("max_model_len") if models else None

    # ------------------------------------------------------------------------------------------------ harness
    def generate_batch(self, processor: FlamingoProcessor, load: MediaLoader, task: Task,
                       prompts: Sequence[tuple[str, list[str]]], **generation: Any) -> list[dict[str, Any]]:
        """Greedy continuations -> [{"prediction", "raw"}], as `predict.generate_batch`."""
        settings = {"max_new_tokens": task.max_new_tokens, "num_beams": task.num_beams, **generation}
        if settings["num_beams"] != 1:
            raise ValueError(f"{task.name} decodes with {settings['num_beams']} beams; a server decodes greedily: "
                             "evaluate with --num-beams 1")
        bodies = [{"prompt": self._ids(processor, load, task, text, media), "media": self._media(media),
                   "max_tokens": int(settings["max_new_tokens"]), "temperature": 0} for text, media in prompts]
        texts = [reply["choices"][0]["text"] for reply in self._post_all("/v1/completions", bodies)]
        return [{"prediction": task.postprocess(t), "raw": t} for t in texts]

    def rank_batch(self, processor: FlamingoProcessor, load: MediaLoader, task: Task, samples: Sequence[Sample],
                   prompts: Sequence[tuple[str, list[str]]]) -> list[dict[str, Any]]:
        """Each candidate's summed log-probability after its prompt -> the task's records, as `predict.rank_batch`."""
        candidates = [task.candidates_for(sample) for sample in samples]
        scores = self.score_batch(processor, load, task, prompts, candidates)
        return [task.from_scores(sample, cands, s) for sample, cands, s in zip(samples, candidates, scores)]

    def score_batch(self, processor: FlamingoProcessor, load: MediaLoader, task: Task,
                    prompts: Sequence[tuple[str, list[str]]], candidates: Sequence[Sequence[str]]
                    ) -> list[list[float]]:
        """Per prompt, each candidate continuation's summed token log-probability (`model.score_batch`'s values):
        one echo request per candidate, the prompt's ids followed by the candidate's; the first candidate of every
        prompt goes first, so the server's prefix cache holds the prompt (with its log-probabilities) for the rest."""
        bodies, spans = [], []
        for (text, media), cands in zip(prompts, candidates):
            ids, urls = self._ids(processor, load, task, text, media), self._media(media)
            for continuation in continuation_ids_of(processor, task, cands):
                bodies.append({"prompt": ids + continuation, "media": urls, "max_tokens": 0, "echo": True,
                               "logprobs": 0, "temperature": 0})
                spans.append(len(continuation))
        # each prompt's first candidate, then the others: their prompt's blocks are in the server's prefix cache by then
        firsts = [sum(len(c) for c in candidates[:i]) for i in range(len(candidates)) if candidates[i]]
        rest = [j for j in range(len(bodies)) if j not in set(firsts)]
        replies = dict(zip(firsts, self._post_all("/v1/completions", [bodies[j] for j in firsts])))
        replies.update(zip(rest, self._post_all("/v1/completions", [bodies[j] for j in rest])))
        values = [replies[j]["choices"][0]["logprobs"]["token_logprobs"][-n:] for j, n in enumerate(spans)]
        out, at = [], 0
        for cands in candidates:
            out.append([float(sum(v)) for v in values[at:at + len(cands)]])
            at += len(cands)
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
            kind = mimetypes.guess_type(path)[0] or ("video/mp4" if path.lower().endswith(VIDEO_EXTENSIONS)
                                                     else "image/png")
            with open(path, "rb") as f:
                url = f"data:{kind};base64," + base64.b64encode(f.read()).decode()
            self._urls.put(path, url)
        return url

    def _post_all(self, path: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(bodies)))) as pool:
            return list(pool.map(lambda body: self._post(path, body), bodies))

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request(path, body)

    def _request(self, path: str, body: Optional[dict[str, Any]]) -> dict[str, Any]:
        """POST `body` (GET when None) -> the decoded JSON answer; a clear RuntimeError for an error answer."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (the user's server)
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise RuntimeError(f"the server at {self.base_url} answered {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"cannot reach the server at {self.base_url}: {e.reason}") from None
