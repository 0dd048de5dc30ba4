"""`build_sources`: one resumable `DatasetSource` (the trainer's `BatchSource`) per configured dataset.

A source runs `S = max(1, num_workers)` streams per rank (in-process for num_workers=0, one per DataLoader worker
otherwise) and emits their batches in a fixed round-robin order (stream 0, 1, ..., S-1, 0, ...; exhausted streams
drop out). Whatever order the DataLoader delivers in, the main process re-orders to that canonical one, so the
sequence of batches is a pure function of (files, seed, epoch, rank, world_size, num_workers).

State (`state_dict()`): the epoch, the round-robin turn, and per stream the raw records consumed (`pos`), batches and
samples emitted, whether it is exhausted, its skip counts, and how many of its emitted samples `max_tokens` cut
(`truncated`). `iter(source)` always continues from the current state: after `load_state_dict` it yields exactly the
batches that would have come next; when the epoch ends it raises StopIteration once and the next `iter()` starts the
following epoch (reshuffled by its epoch number).
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import traceback
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, NoReturn, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..processing import FlamingoProcessor
from ..runtime.warn import warn_outside
from .errors import merge_counts
from .spec import DatasetSpec
from .streaming import StreamItem, iterate_stream

log = logging.getLogger(__name__)
STATE_VERSION = 1


@contextmanager
def _unset_env(name: str, value: str) -> Iterator[None]:
    """The environment variable `name` set to `value` inside the block, where the process has none; then unset."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _identity(x: Any) -> Any:
    return x


@dataclass
class _StreamError:
    """A ValueError a worker's stream raised (bad data: a mostly-bad file, a file that does not parse, a video
    `TooLong`), handed to the main process as an item, which re-raises it with its own message as num_workers=0 does
    (torch's re-raise would make the worker's whole traceback the message)."""

    stream: int  # local stream index (= DataLoader worker id)
    message: str
    traceback: str
    error: Optional[ValueError] = None  # the error itself where it crosses processes intact (`_portable`)

    def reraise(self) -> NoReturn:
        """Raise the worker's error in this process: its own class where `_portable` kept it (a caller's
        `except TooLong` catches it as with num_workers=0), else a ValueError with its message."""
        raise (self.error if self.error is not None else ValueError(self.message)) from WorkerTraceback(
            self.traceback)


def _portable(error: ValueError) -> Optional[ValueError]:
    """`error`, or one of its class rebuilt from its message, as it comes out of a pickle (the worker queue): same
    class and message. None where neither crosses (a class defined in a function, one whose constructor takes
    other arguments and no `__reduce__`), for a plain ValueError instead."""
    message = str(error)
    for make in (lambda: error, lambda: type(error)(message)):
        try:
            crossed = pickle.loads(pickle.dumps(make()))
        except Exception:  # any class: its constructor or its pickling may raise anything
            continue
        if type(crossed) is type(error) and str(crossed) == message:
            return crossed
    return None


class WorkerTraceback(Exception):
    """A data worker's traceback, as text: the cause of the ValueError re-raised in the main process."""


def _reporting_errors(items: Iterator[StreamItem], stream: int) -> Iterator[Union[StreamItem, _StreamError]]:
    """A worker's stream `items`, ending in a `_StreamError` where it raises a ValueError."""
    try:
        yield from items
    except ValueError as e:
        yield _StreamError(stream, str(e), traceback.format_exc(), _portable(e))


class _Streams(IterableDataset):
    """Runs in each DataLoader worker: worker w is local stream w."""

    def __init__(self, source: "DatasetSource", epoch: int, starts: list[dict[str, Any]]) -> None:
        self.source, self.epoch, self.starts = source, epoch, starts

    def __iter__(self) -> Iterator[Union[StreamItem, _StreamError]]:
        info = get_worker_info()
        s = info.id if info is not None else 0
        if self.starts[s]["done"]:
            return iter(())
        return _reporting_errors(self.source._stream(s, self.epoch, self.starts[s]), s)


class DatasetSource:
    """Collated batches of one dataset for one rank, with exact resume. See the module docstring."""

    def __init__(self, spec: DatasetSpec, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, prefetch_factor: int = 2) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.spec = spec
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = num_workers
        self.num_streams = max(1, num_workers)
        self.prefetch_factor = prefetch_factor
        self.epoch = 0
        self.skipped_past: dict[str, int] = {}  # skips of finished epochs
        self.truncated_past = 0  # samples of finished epochs cut by max_tokens
        self._warned_truncated = False  # this process warned about the first cut caption or answer
        self._generation = 0  # bumped by every iter() / load_state_dict: older iterators stop
        self._new_epoch()

    # ------------------------------------------------------------------------------------------------ state
    def _new_epoch(self) -> None:
        self.turn = 0
        self.streams = [{"pos": 0, "batches": 0, "samples": 0, "done": False, "skipped": {}, "truncated": 0}
                        for _ in range(self.num_streams)]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far (all epochs, all of this rank's workers), by reason."""
        return merge_counts([self.skipped_past, *(s["skipped"] for s in self.streams)])

    @property
    def truncated(self) -> int:
        """Samples emitted so far (all epochs, all of this rank's workers) that `max_tokens` cut: the end of their
        text (a caption's, an answer's, a document's) is not trained. Kept, not skipped: see `_note_truncated`."""
        return self.truncated_past + sum(s.get("truncated", 0) for s in self.streams)

    @property
    def batches_this_epoch(self) -> int:
        return sum(s["batches"] for s in self.streams)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "turn": self.turn,
                "streams": copy.deepcopy(self.streams), "skipped_past": dict(self.skipped_past),
                "truncated_past": self.truncated_past,
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "num_streams": self.num_streams}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generation += 1
        self.epoch = int(state["epoch"])
        self.skipped_past = dict(state.get("skipped_past", {}))
        self.truncated_past = int(state.get("truncated_past", 0))  # a state saved before it was counted: 0
        # The seed orders this dataset's files and records only: the position goes on under the seed it was made
        # with, whatever seed this source was built with (`build_sources` seeds by list index, so removing, adding
        # or reordering other datasets changes it)
        self.seed = int(state.get("seed", self.seed))
        if state.get("num_streams") == self.num_streams and state.get("world_size") == self.world_size:
            self.turn = int(state["turn"])
            self.streams = copy.deepcopy(state["streams"])
            return
        warn_outside(f"dataset {self.name!r} (rank {self.rank}): the saved data position was made with world_size="
                     f"{state.get('world_size')} and {state.get('num_streams')} stream(s) (train.num_workers), now "
                     f"{self.world_size} and {self.num_streams}: restarting epoch {self.epoch} from its beginning "
                     "(not an exact resume)")
        self._new_epoch()

    # ------------------------------------------------------------------------------------------------ iteration
    def _stream(self, s: int, epoch: int, start: dict[str, Any]) -> Iterator[StreamItem]:
        g = self.rank * self.num_streams + s
        return iterate_stream(self.spec, epoch=epoch, seed=self.seed, stream=g, local_stream=s,
                              num_streams=self.world_size * self.num_streams, start=start["pos"],
                              samples=start["samples"], skipped=start["skipped"])

    def _items(self, epoch: int) -> Iterator[StreamItem]:
        starts = copy.deepcopy(self.streams)
        if self.num_workers == 0:
            return self._stream(0, epoch, starts[0]) if not starts[0]["done"] else iter(())
        # A generator of its own: each `iter` of a DataLoader draws a base seed, from torch's global generator
        # otherwise, which training draws from too (dropout): a resume or a validation pass would shift it. The
        # streams seed themselves (by seed, epoch and stream), so the workers' base seed is not read.
        loader = DataLoader(_Streams(self, epoch, starts), batch_size=None, num_workers=self.num_workers,
                            collate_fn=_identity, prefetch_factor=self.prefetch_factor,
                            generator=torch.Generator().manual_seed(self.seed))
        with _unset_env("TOKENIZERS_PARALLELISM", "false"):  # the workers fork here and tokenize: no HF warning,
            return iter(loader)  # and the process's own tokenizer calls keep their threads

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._generation += 1
        return self._iterate(self._generation)

    def _advance_turn(self) -> None:
        for k in range(1, self.num_streams + 1):
            s = (self.turn + k) % self.num_streams
            if not self.streams[s]["done"]:
                self.turn = s
                return

    def _iterate(self, generation: int) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        items = self._items(epoch)
        pending: dict[int, deque[Union[StreamItem, _StreamError]]] = {s: deque() for s in range(self.num_streams)}
        while not all(s["done"] for s in self.streams):
            s = self.turn
            if self.streams[s]["done"]:
                self._advance_turn()
                continue
            while not pending[s]:
                try:
                    item = next(items)
                except StopIteration:
                    raise RuntimeError(f"dataset {self.name!r}: stream {s} ended without its end marker") from None
                except (RuntimeError, ConnectionError) as e:  # torch's own: a worker killed (a decoder's crash,
                    # the OOM killer), seen as its exit or as the reset of the socket its batch came through
                    # (a live worker's own error comes as its type with "Caught ... in DataLoader worker": as is)
                    died = "exited unexpectedly" in str(e) or (isinstance(e, ConnectionError)
                                                               and not str(e).startswith("Caught "))
                    if self.num_workers == 0 or not died:
                        raise
                    del items
                    raise RuntimeError(f"dataset {self.name!r} (rank {self.rank}): a DataLoader worker died ({e}): "
                                       "a decoder's crash or the OOM killer? A run resumes from its last checkpoint; "
                                       "train.num_workers=0 reads in this process, where the failing record shows"
                                       ) from e
                pending[item.stream].append(item)
            item = pending[s].popleft()
            if isinstance(item, _StreamError):  # at its stream's turn, as the stream of num_workers=0 would raise it
                del items  # the workers stop now, not whenever the traceback (holding this frame) is collected
                item.reraise()
            state = self.streams[s]
            state.update(pos=item.pos, samples=item.samples, skipped=item.skipped)
            if item.batch is None:
                state["done"] = True
                self._advance_turn()
                continue
            state["batches"] += 1
            self._note_truncated(state, item.batch.pop("truncated", []))
            self._advance_turn()
            yield item.batch
            if generation != self._generation:  # a newer iter() or load_state_dict took over
                return
        self._end_epoch(epoch)

    def _note_truncated(self, state: dict[str, Any], keys: Sequence[str]) -> None:
        """Count a batch's samples that `max_tokens` cut (`sequence.collate`'s `truncated`) into its stream's
        state. A kind whose samples end in a caption or an answer (all but `interleaved`, whose long documents are
        cut as the paper cuts them) warns once per process at the first: the default `max_tokens` (32 for pairs) can
        cut a multi-image row's answer, or a long caption's end, and training would never see it."""
        if not keys:
            return
        state["truncated"] = state.get("truncated", 0) + len(keys)
        if self.spec.kind != "interleaved" and not self._warned_truncated:
            self._warned_truncated = True
            message = (f"dataset {self.name!r} (rank {self.rank}): sample {keys[0]} is longer than max_tokens="
                       f"{self.spec.options['max_tokens']} and was cut: the end of its {self._text_end} is not "
                       "trained. `source.truncated` counts such samples and each epoch's report gives their "
                       "number; raise the dataset's max_tokens option if they are many")
            warnings.warn(message, stacklevel=4)  # the one report (a log record too would print it twice)

    @property
    def _text_end(self) -> str:
        return {"chat": "last answer", "interleaved": "document"}.get(self.spec.kind, "caption")

    def _end_epoch(self, epoch: int) -> None:
        batches = self.batches_this_epoch
        skipped = merge_counts(s["skipped"] for s in self.streams)
        truncated = sum(s.get("truncated", 0) for s in self.streams)
        if skipped or truncated:
            kept = f"kept {sum(s['samples'] for s in self.streams)}" + (
                f", {truncated} of them cut by max_tokens={self.spec.options['max_tokens']}" if truncated else "")
            message = (f"dataset {self.name!r} (rank {self.rank}) epoch {epoch}: "
                       + (f"skipped {sum(skipped.values())} bad sample(s) {skipped}; " if skipped else "") + kept)
            if skipped or self.spec.kind != "interleaved":  # documents longer than max_tokens are the rule
                warnings.warn(message, stacklevel=3)
            else:
                log.info(message)
        if batches == 0:
            raise ValueError(f"dataset {self.name!r} gave no batch of {self.spec.batch_size} in epoch {epoch} on "
                             f"rank {self.rank} of {self.world_size} with {self.num_streams} stream(s) (files: "
                             f"{self.spec.files[:3]}{'...' if len(self.spec.files) > 3 else ''}; skipped: "
                             f"{skipped}): too few good samples for the batch size and the number of ranks x workers")
        self.skipped_past = merge_counts([self.skipped_past, skipped])
        self.truncated_past += truncated
        self.epoch = epoch + 1
        self._new_epoch()


def build_source(section: Any, processor: Optional[FlamingoProcessor], *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, vocab: Optional[int] = None) -> DatasetSource:
    """One `DatasetSection` (name, kind, path, batch_size, options) -> its `DatasetSource`; vocab: the trained model's
    embedding rows (`DatasetSpec.create`: they decide its chat format)."""
    spec = DatasetSpec.create(section.name, section.kind, section.path, section.batch_size, section.options,
                              processor, vocab)
    return DatasetSource(spec, rank=rank, world_size=world_size, seed=seed, num_workers=num_workers)


def build_sources(datasets: Sequence[Any], processor: FlamingoProcessor, *, rank: int = 0, world_size: int = 1,
                  seed: int = 0, num_workers: int = 0, vocab: Optional[int] = None) -> dict[str, DatasetSource]:
    """The trainer's entry point: {dataset name: source}. Sources of different datasets get different seeds; vocab:
    the trained model's embedding rows (`build_source`)."""
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must be unique, got {names}")
    return {d.name: build_source(d, processor, rank=rank, world_size=world_size, seed=seed + 1000 * i,
                                 num_workers=num_workers, vocab=vocab) for i, d in enumerate(datasets)}
