"""The serving engine: a bounded queue of requests and one thread that runs the continuous-batching loop.

Each turn of the loop (`Engine._turn`): drop cancelled work; start the prefill of the waiting requests whose choices
fit in the free rows (in order); run one decode step for all running rows; then one prefill step, shared by the
prefills in order: a media step (up to `media_per_step` media, of the prompts that need media next) or a token step
(up to `prefill_chunk` tokens, of the prompts that need tokens next). So a joining request's prefill stalls the
running rows by at most one chunk or one media step per turn, several short prompts can join in one turn, and a
request joins at the step after its prefill ends. With no row running, nobody waits: the first prompt is prefilled
at once. With a prefix cache (`prefix_cache_mib`), a prompt that begins as an earlier one did (the same few-shot
demonstrations and images) starts its prefill after their shared whole blocks; the usage reports those tokens as
`prompt_tokens_details.cached_tokens`, as OpenAI's API does. A request's choices (`n`) share its prefill and decode
as separate rows; with a response format, each choice's tokens obey its grammar (serve/structured.py). A request
that asks for logprobs gets each generated token's log-probability (and its position's likeliest tokens) with its
delta; one that echoes its prompt with logprobs gets the prompt's before its first token (its prefill keeps every
position's logits, starting from prefix-cache blocks that keep their tokens' log-probabilities). Rows leave at EOS /
`<|endofchunk|>`, a stop string, `max_tokens`, the end of their grammar, or when their client goes away (at the next
step).

Text goes out as it is decoded: each choice decodes its new token in a short window (flamingo/detokenize.py, a cost per
token that does not grow with the answer) and emits what is new (an empty delta when nothing is), holding back a tail
that could still become a stop string or is an incomplete UTF-8 character.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..chat import BLANKS
from ..config import MEDIA_TOKEN
from ..detokenize import IncrementalText
from ..model.batching import DecodeBatch
from ..model.feature_cache import VisionFeatureCache
from ..model.generation import generation_config_for
from ..model.logprobs import TokenLogprobs, token_logprobs
from ..model.prefill import Prefill, PrefilledRow, can_prefill_together, prefill_together
from ..model.prefix_cache import PrefixCache
from .metrics import Metrics
from .sampling import SamplingParams, pick_tokens, row_generator
from .structured import GrammarFailed

log = logging.getLogger(__name__)

DEFAULT_PREFIX_CACHE_MIB = 1024  # on the model's device; at bench's gpu shape (bf16) ~5,400 prompt tokens' K/V
DEFAULT_VISION_CACHE_MIB = 256  # the tower's features by frame content: ViT-L/14 at 224 px, fp32, ~1 MiB a frame


# Tokens (padding included) of one shared prefill call while no row runs, on a CPU and on a GPU. On one CPU thread a
# shared call of 2-16 equal prompts took 0.48-0.77x their time one at a time, from 27 to 323 tokens (16 x 323 = 5168
# tokens: 0.68x); prompts of 27, 101 and 323 tokens padded to 2.15x their tokens took 1.11x (bench/README.md,
# "Prompts prefilled together"). On a GPU, unmeasured: a larger call, as long as it fits beside the running batch.
PREFILL_BATCH_TOKENS = (4096, 8192)
THREAD_POLL_S = 1.0  # how often a call waiting on the engine's thread checks that the thread still runs
PADDING_LIMIT = 1.5  # a shared call computes at most this many times its prompts' own tokens



def find_stop(text: str, stops: Sequence[str], final: bool) -> int:
    """Where the first stop string starts in `text`, or -1. Unless the text is `final`, its trailing U+FFFDs may be
    the start of a character that the next tokens complete (a byte-level BPE decode writes one U+FFFD for a truncated
    UTF-8 sequence, a SentencePiece byte-fallback decode one per byte): a stop string never matches into them, as the
    stream holds them back."""
    stable = text if final else text.rstrip("\ufffd")
    return min((i for i in (stable.find(s) for s in stops) if i >= 0), default=-1)


def check_engine_options(max_batch: int, max_queue: int, prefill_chunk: int) -> None:
    """Refuse sizes under which an engine could never run a request (a queue of 0 turns every request away);
    `server.build_engine` calls it before it loads the model."""
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


class QueueFull(Exception):
    """The waiting queue is full: the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is busy: too many requests are waiting")
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The server is shutting down."""


@dataclass
class Event:
    """What the engine tells a request's handler: a text delta of one choice, a choice's end, the request's end
    (with its usage) or an error."""

    kind: str  # "prompt" | "delta" | "finish" | "done" | "error"
    choice: int = 0
    text: str = ""
    finish_reason: Optional[str] = None
    usage: Optional[dict[str, Any]] = None  # OpenAI's usage object
    message: str = ""
    tokens: Optional[list[int]] = None  # "finish": the choice's token ids (its stop token included)
    # "delta": its token, with its log-probabilities when the request asked for them (a stop token too: the usage
    # counts it, and evaluation harnesses drop the last generated token's entry); "prompt": the prompt's tokens
    # 1..T-1 (of a request echoing its prompt with logprobs)
    logprobs: Optional[TokenLogprobs] = None
    token: Optional[int] = None


@dataclass(eq=False)
class Job:
    """One request: prompt ids (T,), its media as the processor batches them, how to sample, and where to send
    events (called from the engine thread; must be thread-safe and quick). Jobs compare by identity (the queue
    removes a job by `==`; comparing prompt tensors would raise)."""

    prompt_ids: torch.Tensor
    media: dict[str, Any]
    params: SamplingParams
    emit: Callable[[Event], None]
    # chat answers: the blanks (spaces, tabs) they start with are the format's gap before an answer, left out
    strip_leading_whitespace: bool = False
    grammar: Optional[Any] = None  # a response format's compiled grammar (serve/structured.py): each choice obeys it
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    request_id: Optional[str] = None  # its HTTP request's X-Request-Id: the log lines about the job name it
    cache_salt: Optional[str] = None  # its prefix and vision cache entries are found only under the same salt
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose prefill came from the prefix cache
    open_choices: int = 0


class _Choice:
    """One running row: a choice of a job, its tokens so far and the text already sent."""

    def __init__(self, job: Job, index: int, generator: Optional[torch.Generator], processor: Any,
                 counts: Optional[torch.Tensor] = None) -> None:
        """counts: zeros (V,) when the request has frequency / presence penalties: each generated token's count,
        updated per token, so the penalties cost O(V) per step whatever the answer's length."""
        self.job, self.index, self.generator = job, index, generator
        self.constraint = job.grammar.constraint() if job.grammar is not None else None
        self.tokens: list[int] = []
        self.counts = counts
        self.text = IncrementalText(processor)  # the tokens' text, decoded as they come
        self.sent = 0  # characters of the text already emitted
        self.last_step_at = 0.0


class Engine:
    """Owns the model once started: every model call happens on its thread."""

    def __init__(self, model: Any, processor: Any, *, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 64, media_per_step: int = 2,
                 prefix_cache_mib: float = DEFAULT_PREFIX_CACHE_MIB,
                 vision_cache_mib: float = DEFAULT_VISION_CACHE_MIB, metrics: Optional[Metrics] = None,
                 compile_backend: Optional[str] = None, prefill_batch_tokens: Optional[int] = None) -> None:
        """compile_backend: decode steps under `torch.compile` with this backend ("inductor": CUDA graphs on a GPU),
        in fixed shapes (model/batching.py); the first steps of each shape compile. prefill_batch_tokens: waiting
        prompts are prefilled together in one call of up to this many tokens (padding included) while no row runs,
        and of up to `prefill_chunk` while rows run; 0: one at a time; None: `PREFILL_BATCH_TOKENS` of the device."""
        check_engine_options(max_batch, max_queue, prefill_chunk)
        self.model, self.processor = model, processor
        self.compile_backend = compile_backend
        self.prefix_cache = PrefixCache.of_mib(prefix_cache_mib)  # prompts that begin alike share their prefill
        # a frame seen before (a prompt list's shared image, demonstrations reused across queries, a chat resending
        # its image) skips the frozen tower
        self.vision_cache = VisionFeatureCache.of_mib(vision_cache_mib) if model.config.freeze_vision else None
        self._vision_counted = (0, 0)  # the cache's frame counts already in the metrics
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.device = next(model.lm.parameters()).device
        self.prefill_batch_tokens = PREFILL_BATCH_TOKENS[self.device.type == "cuda"] if prefill_batch_tokens is None \
            else prefill_batch_tokens
        self.media_per_step = media_per_step  # media a joining prompt encodes per turn while rows are running
        self.metrics = metrics or Metrics()
        config = generation_config_for(model)
        self.eos = set(config.eos_token_id)
        self.suppress = list(config.suppress_tokens or [])
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._batch = DecodeBatch(model, max_batch, compile_backend=compile_backend)
        self._rows: list[_Choice] = []  # row i of the batch
        self._prefills: list[tuple[Job, Prefill]] = []  # admitted, in order; their rows are reserved
        self._accepting = True
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._calls: list[tuple[Callable[[], None], Future]] = []  # work for the thread before its next turn

    # ------------------------------------------------------------------------------------------------ control
    def start(self) -> None:
        """Start the engine's thread (once; `warm_up` may have started it): every model call runs on it."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flamingo-engine", daemon=True)
                self._thread.start()

    def warm_up(self) -> None:
        """Compile the batch's decode step (with `compile_backend`) for the shapes every server meets first: one row
        and several, in the first window of positions, without and with an image; before requests come, so that no
        request waits for them. Longer windows compile when a batch first reaches them. It runs on the engine's
        thread (started here), where the steps will run: torch keeps CUDA graphs per thread (a graph recorded on
        another is recorded again), and before torch 2.13 a thread other than the first to use them failed."""
        self._on_thread(self._warm_up)

    def _on_thread(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine's thread before its next turn and wait for it (its exception is raised here); a
        RuntimeError if the thread has ended without running it (no timeout otherwise: a compile takes minutes)."""
        self.start()
        done: Future = Future()
        with self._cond:
            if self._stopping:
                raise NotAccepting("the server is shutting down")
            self._calls.append((fn, done))
            self._cond.notify()
        thread = self._thread
        while True:
            try:
                return done.result(timeout=THREAD_POLL_S)
            except FutureTimeout:
                if thread is not None and not thread.is_alive() and not done.done():
                    raise RuntimeError("the engine's thread has ended: it cannot run the call") from None

    @torch.no_grad()
    def _warm_up(self) -> None:
        """`warm_up`'s work, on the engine's thread: in the batch rows of its own, which it leaves empty."""
        from PIL import Image  # the processor's own dependency

        if self._rows or self._prefills:
            raise RuntimeError("warm_up runs before requests come: the batch holds running requests' rows")
        dtype = next(self.model.vision.parameters()).dtype
        for text, media in (("warm up", []), (f"{MEDIA_TOKEN} warm up", [Image.new("RGB", (64, 64))])):
            ids, medium = self.processor.encode_prompt(text, media, image_references=False)
            batch = self.processor.batch_media([medium])
            images = None if batch["images"] is None else batch["images"].to(dtype)
            row = Prefill(self.model, torch.tensor(ids), images, batch.get("num_media"), batch.get("num_frames"))
            prefilled = None
            while prefilled is None:
                prefilled = row.step()
            try:
                for rows in (1, 2):
                    self._batch.add(prefilled)
                    self._batch.step(torch.zeros(rows, dtype=torch.long))
            finally:  # its rows leave, a failure's too: none for the first requests to trip on
                for i in reversed(range(self._batch.rows)):
                    self._batch.remove(i)

    def submit(self, job: Job) -> None:
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue jobs, all or none (a request with several prompts)."""
        for job in jobs:
            if job.params.n > self.max_batch:
                raise ValueError(f"n={job.params.n} is more than the server's --max-batch {self.max_batch}")
        with self._cond:
            if not self._accepting:
                raise NotAccepting("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(retry_after=1 + (len(self._waiting) + len(jobs)) // max(1, self.max_batch))
            self._waiting.extend(jobs)
            self.metrics.set_gauge("queue_depth", len(self._waiting))
            self._cond.notify()

    def drain(self) -> None:
        """Stop accepting requests; those already in keep running."""
        with self._cond:
            self._accepting = False

    def busy(self) -> bool:
        with self._cond:
            return bool(self._waiting or self._prefills or self._rows)

    def stop(self, grace: float = 0.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace` seconds, cancel the rest, end the
        thread."""
        self.drain()
        deadline = time.monotonic() + grace
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
        else:  # never started: fail what waits
            self._fail_all("the server is shutting down", include_waiting=True)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------------------------------------ loop
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self._calls or self._waiting or self._prefills or self._rows):
                    self._cond.wait(timeout=0.5)
                calls, self._calls = self._calls, []
                if self._stopping:
                    break
            for fn, done in calls:
                try:
                    fn()
                except BaseException as e:  # the caller's to raise
                    done.set_exception(e)
                else:
                    done.set_result(None)
            try:
                self._turn()
            except Exception as e:  # a bug or an accelerator error: fail what is running, keep serving
                log.exception("engine step failed (requests %s fail)", self._request_ids())
                self._fail_all(f"internal error while generating: {type(e).__name__}: {e}")
        for _, done in calls:
            done.set_exception(NotAccepting("the server is shutting down"))
        self._fail_all("the server is shutting down", include_waiting=True)

    def _turn(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._rows:
            self._decode_step()
        if self._prefills:
            self._prefill_step()

    def _admit(self) -> None:
        """Start the prefill of every waiting request, in order, whose choices fit in the rows not yet taken or
        reserved by earlier prefills."""
        while True:
            reserved = sum(job.params.n for job, _ in self._prefills)
            with self._cond:
                if not self._waiting or self._waiting[0].params.n > self._batch.free_rows() - reserved:
                    return
                job = self._waiting.popleft()
                self.metrics.set_gauge("queue_depth", len(self._waiting))
            # the prefill holds the media while it needs them; the job, which lives as long as its answer (and, in
            # the reference cycles of a cut stream's traceback, until the collector runs), no longer does
            media, salt, job.media = job.media, job.cache_salt, {}
            prefix = None if self.prefix_cache is None else self.prefix_cache.salted(salt)  # its salt's entries
            vision = None if self.vision_cache is None else self.vision_cache.salted(salt)
            try:
                self._prefills.append((job, Prefill(
                    self.model, job.prompt_ids, media.get("images"), media.get("num_media"), media.get("num_frames"),
                    chunk=self.prefill_chunk, prefix_cache=prefix, vision_cache=vision,
                    prompt_logprobs=(job.params.logprobs or 0) if job.params.echo_logprobs else None)))
            except ValueError as e:  # only this request fails
                job.emit(Event("error", message=str(e)))

    def _prefill_step(self) -> None:
        """With rows running, a turn is a media step or a token step, shared by the prefills in order: up to
        `media_per_step` media of the prompts that need media next, or up to `prefill_chunk` tokens of those that
        need tokens next (so a short prompt, or one mostly in the prefix cache, leaves the rest of the turn to the
        next one, and running rows still wait at most one chunk or one media step). With none running, nobody waits:
        the first prompt is prefilled whole."""
        if self._prefill_together():
            return
        tokens, media, kind = self.prefill_chunk, self.media_per_step, None
        for job, prefill in list(self._prefills):
            if kind is not None and (tokens if kind == "tokens" else media) <= 0:
                return  # not prepared before its turn: a prompt takes the prefix cache's blocks as late as it can
            try:
                prefill.prepare()
            except ValueError as e:  # only this request fails
                self._prefills.remove((job, prefill))
                job.emit(Event("error", message=str(e)))
                continue
            if not self._rows:
                self._run_prefill(job, prefill, 2**62, None)
                return
            step_kind = "media" if prefill.needs_media else "tokens"
            if kind not in (None, step_kind):
                return  # a turn is a media step or a token step
            kind = step_kind
            done, encoded = prefill.done, prefill.media_done
            self._run_prefill(job, prefill, tokens, media)
            tokens -= prefill.done - done
            media -= prefill.media_done - encoded

    def _prefill_together(self) -> bool:
        """Prefill the leading fresh prompts (`Prefill.fresh`) in one call when two or more fit in the turn's budget:
        `prefill_batch_tokens` padded tokens with no row running; with rows running, `prefill_chunk` tokens and
        `media_per_step` media (a turn's cost for the running rows stays as it was). Returns whether it ran."""
        if self.prefill_batch_tokens <= 0 or len(self._prefills) < 2:
            return False
        running = bool(self._rows)
        budget = min(self.prefill_chunk, self.prefill_batch_tokens) if running else self.prefill_batch_tokens
        group: list[tuple[Job, Prefill]] = []
        firsts: set[bytes] = set()  # the group's first prefix-cache blocks
        salts: set[Optional[str]] = set()  # of its prompts with media: one vision tower call, through one cache view
        longest = tokens = media = 0
        for job, prefill in self._prefills:
            try:
                keys = prefill.block_keys()
                if keys and keys[0] in firsts:  # it begins like a prompt of the group: after the call it reuses
                    break  # that prompt's blocks (its lookup happens then, not before)
                prefill.prepare()
            except ValueError:
                break  # the one-at-a-time path reports it
            if not prefill.fresh or (prefill.total_media and salts and job.cache_salt not in salts):
                break
            length, tokens = max(longest, prefill.length), tokens + prefill.length
            media += prefill.total_media
            padded = length * (len(group) + 1)
            if padded > budget or padded > PADDING_LIMIT * tokens or (running and media > self.media_per_step):
                break
            longest = length
            group.append((job, prefill))
            firsts.update(keys[:1])
            if prefill.total_media:
                salts.add(job.cache_salt)
        if len(group) < 2 or not can_prefill_together(self.model, longest):
            return False
        try:
            rows = prefill_together(self.model, [prefill for _, prefill in group])
        except Exception:  # bad media the checks missed: one at a time, where only its own request fails
            log.exception("requests %s: shared prefill failed; prefilling its prompts one at a time",
                          ", ".join(str(job.request_id) for job, _ in group))
            for pair in group:
                if pair[1].ctx is not None:  # past the shared call: it cannot go on alone
                    self._prefills.remove(pair)
                    pair[0].emit(Event("error", message="prefill failed"))
            return False
        self.metrics.inc("prefill_calls_shared_total")
        self.metrics.inc("prefill_prompts_shared_total", len(group))
        for pair, row in zip(group, rows):
            self._join(pair[0], row)  # listed until joined: a failure there fails it (`_fail_all`), never strands it
            self._prefills.remove(pair)
        return True

    def _run_prefill(self, job: Job, prefill: Prefill, tokens: int, media: Optional[int]) -> None:
        try:
            row = prefill.step(tokens, media)
        except Exception as e:  # the request's own fault (bad media the checks missed): only it fails
            log.exception("request %s: prefill failed", job.request_id)
            self._prefills.remove((job, prefill))
            job.emit(Event("error", message=f"prefill failed: {type(e).__name__}: {e}"))
            return
        if row is not None:
            self._join(job, row)  # listed until joined: a failure there fails it (`_fail_all`), never strands it
            self._prefills.remove((job, prefill))

    def _join(self, job: Job, row: PrefilledRow) -> None:
        """A prefilled request: its first token, then its choices' rows in the batch."""
        now = time.perf_counter()
        self.metrics.observe("time_to_first_token_seconds", now - job.submitted)
        self.metrics.inc("prompt_tokens_total", row.length)
        job.cached_tokens = row.cached_tokens
        if self.prefix_cache is not None:
            self.metrics.inc("prompt_tokens_cached_total", row.cached_tokens)
            self.metrics.set_gauge("prefix_cache_bytes", self.prefix_cache.bytes)
        if self.vision_cache is not None:  # the cache counts every frame since the start: report what is new
            cache, (frames, computed) = self.vision_cache, self._vision_counted
            self.metrics.inc("vision_frames_total", cache.frames - frames)
            self.metrics.inc("vision_frames_computed_total", cache.computed - computed)
            self.metrics.set_gauge("vision_cache_bytes", cache.bytes)
            self._vision_counted = (cache.frames, cache.computed)
        if row.prompt_logprobs is not None:
            try:
                job.emit(Event("prompt", logprobs=row.prompt_logprobs))
            except Exception as e:  # its own sink: it fails alone
                log.exception("request %s: its prompt could not be sent; it fails, the batch goes on", job.request_id)
                self._fail_job(job, e)
                return
        penalised = bool(job.params.frequency_penalty or job.params.presence_penalty)
        choices = [_Choice(job, i, row_generator(job.params, i, self.device), self.processor,
                           torch.zeros(row.logits.shape[-1], device=self.device) if penalised else None)
                   for i in range(job.params.n)]
        job.open_choices = len(choices)
        if job.params.max_tokens == 0:  # an echo of the prompt only
            try:
                for choice in choices:
                    self._finish_choice(choice, "length")
            except Exception as e:  # its own sink: it fails alone
                log.exception("request %s: its end could not be sent; it fails, the batch goes on", job.request_id)
                self._fail_job(job, e)
            return
        logits = row.logits[None].expand(len(choices), -1)  # (n, V)
        tokens = pick_tokens(logits, [job.params] * len(choices), [c.generator for c in choices], self.suppress,
                             constraints=[c.constraint for c in choices])
        logprobs = self._logprobs(logits, tokens, choices)
        running = [c for c, t, lp in zip(choices, tokens.tolist(), logprobs) if not self._advance_row(c, t, now, lp)]
        if running and not job.cancelled.is_set():
            self._batch.add(row, copies=len(running))
            self._rows.extend(running)
        self.metrics.set_gauge("running_rows", len(self._rows))

    def _decode_step(self) -> None:
        rows = self._rows
        logits = self._batch.step(torch.tensor([c.tokens[-1] for c in rows], dtype=torch.long))
        tokens = pick_tokens(logits, [c.job.params for c in rows], [c.generator for c in rows], self.suppress,
                             generated=[c.tokens if c.counts is None else c.counts for c in rows],
                             constraints=[c.constraint for c in rows])
        logprobs = self._logprobs(logits, tokens, rows)
        now = time.perf_counter()
        self.metrics.observe("batch_size", len(rows))
        finished = [i for i, (c, t, lp) in enumerate(zip(rows, tokens.tolist(), logprobs))
                    if self._advance_row(c, t, now, lp)]
        for i in reversed(finished):
            self._remove_row(i)
        self.metrics.set_gauge("running_rows", len(self._rows))

    def _remove_row(self, i: int) -> None:
        self._batch.remove(i)
        self._rows[i] = self._rows[-1]
        self._rows.pop()

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, choices: list[_Choice]
                  ) -> list[Optional[TokenLogprobs]]:
        """logits (B, V) and the tokens picked (B,) -> each row's token log-probabilities, for the rows whose
        request asked for them (the most alternatives any of them asked for, cut per row)."""
        want = [i for i, c in enumerate(choices) if c.job.params.logprobs is not None]
        out: list[Optional[TokenLogprobs]] = [None] * len(choices)
        if not want:
            return out
        top = max(choices[i].job.params.logprobs for i in want)
        index = torch.tensor(want, device=logits.device)
        found = token_logprobs(logits.index_select(0, index), tokens.to(logits.device).index_select(0, index), top)
        for j, i in enumerate(want):
            k = choices[i].job.params.logprobs
            out[i] = TokenLogprobs(found.logprobs[j:j + 1], found.top_ids[j:j + 1, :k], found.top_logprobs[j:j + 1, :k])
        return out

    def _advance_row(self, choice: _Choice, token: int, now: float, logprobs: Optional[TokenLogprobs]) -> bool:
        """`_advance`, where an error in one choice's own work (its text, grammar, stop strings, events) fails its
        request alone, as a bad grammar does: the other rows of the batch go on (True: the row leaves). A choice
        of a request that failed in this step leaves at once (its error is logged and sent once, not per choice)."""
        if choice.job.cancelled.is_set():
            return True
        try:
            return self._advance(choice, token, now, logprobs)
        except Exception as e:
            log.exception("request %s: its token could not be taken; it fails, the batch goes on",
                          choice.job.request_id)
            self._fail_job(choice.job, e)
            return True

    @staticmethod
    def _fail_job(job: Job, e: Exception) -> None:
        """Fail one request for an error in its own work (its events included); the others go on."""
        job.cancelled.set()  # its other choices leave at the next turn
        try:
            job.emit(Event("error", message=f"internal error while generating: {type(e).__name__}: {e}"))
        except Exception:  # its events cannot be sent: nobody is left to tell
            log.exception("request %s: its error could not be sent", job.request_id)

    def _advance(self, choice: _Choice, token: int, now: float, logprobs: Optional[TokenLogprobs] = None) -> bool:
        """Take one new token of a choice; emit its text (with its log-probabilities, when asked for); True when the
        choice is finished."""
        job, params = choice.job, choice.job.params
        if choice.tokens:
            self.metrics.observe("inter_token_latency_seconds", now - choice.last_step_at)
        choice.last_step_at = now
        choice.tokens.append(token)
        if choice.counts is not None:
            choice.counts[token] += 1
        job.completion_tokens += 1
        self.metrics.inc("generation_tokens_total")
        reason = "stop" if token in self.eos else None
        if reason is None:
            choice.text.add(token)  # <imageK> kept
        if choice.constraint is not None:
            try:
                if choice.constraint.accept(token):
                    reason = "stop"  # the response format's grammar is complete: nothing may follow this token
            except GrammarFailed as e:  # no complete JSON: the request fails (its other choices leave next step)
                job.cancelled.set()
                job.emit(Event("error", message=str(e)))
                return True
        if reason is None and len(choice.tokens) >= params.max_tokens:
            reason = "length"
        if reason is not None:
            choice.text.flush()
        text = choice.text.text.lstrip(BLANKS) if job.strip_leading_whitespace else choice.text.text
        cut = find_stop(text, params.stop, final=reason is not None)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        end = len(text)
        if reason is None:  # hold back what may still become a stop string or a whole character (the U+FFFDs of
            # a character still being decoded are not characters of a stop string: counted, one too many went out)
            end = len(text.rstrip("\ufffd")) - max((len(s) - 1 for s in params.stop), default=0)
            while end > choice.sent and text[end - 1] == "\ufffd":
                end -= 1
        # one delta per token, empty while text is held back: streams show when each token came
        job.emit(Event("delta", choice=choice.index, text=text[choice.sent:end] if end > choice.sent else "",
                       logprobs=logprobs, token=token))
        choice.sent = max(choice.sent, end)
        if reason is None:
            return False
        self._finish_choice(choice, reason)
        return True

    def _finish_choice(self, choice: _Choice, reason: str) -> None:
        job = choice.job
        job.emit(Event("finish", choice=choice.index, finish_reason=reason, tokens=list(choice.tokens)))
        job.open_choices -= 1
        if job.open_choices == 0:
            self._finish_job(job)

    def _finish_job(self, job: Job) -> None:
        prompt = int(job.prompt_ids.numel())
        job.emit(Event("done", usage={"prompt_tokens": prompt, "completion_tokens": job.completion_tokens,
                                      "total_tokens": prompt + job.completion_tokens,
                                      "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}))

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [j for j in self._waiting if j.cancelled.is_set()]
            for job in gone:
                self._waiting.remove(job)
            self.metrics.set_gauge("queue_depth", len(self._waiting))
        self._prefills = [(job, p) for job, p in self._prefills if not job.cancelled.is_set()]
        for i in reversed(range(len(self._rows))):
            if self._rows[i].job.cancelled.is_set():
                self._remove_row(i)
        self.metrics.set_gauge("running_rows", len(self._rows))

    def _request_ids(self) -> str:
        """The ids of the requests running or being prefilled, for a log line about them all."""
        jobs = {id(c.job): c.job for c in self._rows} | {id(job): job for job, _ in self._prefills}
        return ", ".join(str(job.request_id) for job in jobs.values()) or "none"

    def _fail_all(self, message: str, include_waiting: bool = False) -> None:
        jobs = {id(c.job): c.job for c in self._rows}
        jobs.update({id(job): job for job, _ in self._prefills})
        with self._cond:
            if include_waiting:
                jobs.update({id(j): j for j in self._waiting})
                self._waiting.clear()
        for job in jobs.values():
            job.emit(Event("error", message=message))
        self._rows, self._prefills = [], []
        self._batch = DecodeBatch(self.model, self.max_batch, compile_backend=self.compile_backend)
        self.metrics.set_gauge("running_rows", 0)
