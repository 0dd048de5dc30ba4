"""Choosing the in-context demos of each evaluated sample.

- The demo pool is the task's train split, meant to be disjoint from the evaluated test split; a query is never its
  own demo all the same: pool samples showing its first media file are not drawn for it (`own`), and `evaluate`
  warns when the splits overlap. (Ids are not compared: splits often number their samples each from 0.)
- Demos come from a *query set* of pool samples (`query_set_size`): by default 2048 drawn once per trial seed for
  random demos (OpenFlamingo's `get_query_set`) and the whole pool for RICES (OpenFlamingo and Flamingo retrieve
  from the whole train split, so RICES demos are the same in every trial); a number or "all" sets it for either.
- "random": k demos drawn without replacement, with a generator seeded by (seed, sample index) so that a sample's
  demos do not depend on batching or on which rank evaluates it.
- "rices": the k query-set samples nearest to the sample in pooled vision features, most similar last (rices.py).
- Episodes: a sample with `demo_ids` takes the first k of them, in order, whatever the method; an n-way episode
  (`ways` = n, e.g. concept binding) counts shots per class as Frozen's fast binding does: k shots are its first
  k * n demos, which list one demo of each class per shot.
- Zero-shot convention (`zero_shot`): "text" (Flamingo / OpenFlamingo) prompts 0-shot queries with 2 demos of the
  same method whose `<image>` is removed, so the model sees the answer format but no image-answer pair; "none" uses
  the bare query.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from .task import Sample

if TYPE_CHECKING:
    from .rices import FeatureCache

METHODS = ("random", "rices")
ZERO_SHOT = ("text", "none")
ZERO_SHOT_TEXT_DEMOS = 2
RANDOM_QUERY_SET = 2048  # random demos' default query set per seed (OpenFlamingo's `query_set_size`)
QuerySet = Union[int, str, None]  # a number of pool samples, "all", or None: the method's default


def check_zero_shot(zero_shot: str) -> None:
    """Refuse a zero-shot convention other than ZERO_SHOT's."""
    if zero_shot not in ZERO_SHOT:
        raise ValueError(f"zero_shot must be one of {ZERO_SHOT}, got {zero_shot!r}")


def check_query_set(query_set: QuerySet) -> None:
    """Refuse a query set size that is not a number >= 1, "all" or None."""
    if query_set is None or query_set == "all":
        return
    if isinstance(query_set, bool) or not isinstance(query_set, int) or query_set < 1:
        raise ValueError(f"query_set must be >= 1, 'all' (the whole train split) or None ({RANDOM_QUERY_SET} for "
                         f"random demos, the whole train split for RICES), got {query_set!r}")


def effective_query_set(method: str, query_set: QuerySet, pool_size: int) -> int:
    """How many of `pool_size` train samples a trial's demos come from: `query_set` ("all": every one; None: the
    method's default, RANDOM_QUERY_SET for random demos and every one for RICES), at most the pool."""
    check_query_set(query_set)
    if query_set == "all" or (query_set is None and method == "rices"):
        return pool_size
    return min(RANDOM_QUERY_SET if query_set is None else int(query_set), pool_size)


def seeded_prompts(method: str, query_set: QuerySet, pool_size: int, samples: Sequence[Sample], shots: int,
                   zero_shot: str) -> bool:
    """Whether a trial's `shots`-shot prompts depend on its seed: not when no query draws demos from a query set
    (no demos at 0 shots with `zero_shot="none"`, or every query an episode), nor for RICES over the whole pool
    (the nearest demos, the same every trial)."""
    if shots == 0 and zero_shot == "none":
        return False
    if all(s.demo_ids is not None for s in samples):
        return False
    return not (method == "rices" and effective_query_set(method, query_set, pool_size) == pool_size)


class DemoSelector:
    def __init__(self, pool: Sequence[Sample], method: str = "random", query_set_size: QuerySet = None,
                 seed: int = 0, features: Optional["FeatureCache"] = None) -> None:
        if method not in METHODS:
            raise ValueError(f"demo method must be one of {METHODS}, got {method!r}")
        if method == "rices" and features is None:
            raise ValueError("RICES needs a FeatureCache (the model's vision features)")
        self.pool = list(pool)
        self.by_id = {s.id: s for s in self.pool}
        if len(self.by_id) != len(self.pool):
            raise ValueError("the train split has duplicate sample ids")
        self.method, self.seed, self.features = method, seed, features
        size = effective_query_set(method, query_set_size, len(self.pool))
        if size == len(self.pool):  # the whole pool: the same query set whatever the seed
            self.query_set = list(self.pool)
        else:
            chosen = np.random.default_rng(seed).choice(len(self.pool), size=size, replace=False)
            self.query_set = [self.pool[i] for i in sorted(chosen)]
        # query-set positions by first media file: what a query must not get as its own demo
        self._by_media: dict[str, list[int]] = {}
        for i, s in enumerate(self.query_set):
            if s.media:
                self._by_media.setdefault(s.media[0], []).append(i)
        self._query_features = None

    def own(self, sample: Sample) -> set[int]:
        """Query-set positions of `sample` itself: the pool samples showing its first media file (the same image,
        whatever its id: ids are per split, and a demo of the query's own image would show its answer)."""
        return set(self._by_media.get(sample.media[0], ())) if sample.media else set()

    def drawable(self, sample: Sample) -> int:
        """How many query-set samples `sample` may get as demos (all but itself)."""
        return len(self.query_set) - len(self.own(sample))

    def select(self, sample: Sample, index: int, k: int) -> list[Sample]:
        """The k demos of the evaluated sample at position `index` of the evaluated list, in prompt order."""
        if k == 0:
            return []
        if sample.demo_ids is not None:
            return self.episode_demos(sample, k * (sample.ways or 1), f"{k} shots")
        own = self.own(sample)
        n = len(self.query_set)
        if k > n - len(own):
            raise ValueError(f"{k} shots asked but the query set holds {n - len(own)} samples other than "
                             f"{sample.id!r}")
        if self.method == "rices":
            return self.select_rices([sample], k)[0]
        allowed: Sequence[int] = [i for i in range(n) if i not in own] if own else range(n)  # positions it may draw
        rng = np.random.default_rng([self.seed, index])  # without an overlap `allowed` is every position
        return [self.query_set[allowed[i]] for i in rng.choice(len(allowed), size=k, replace=False)]

    def episode_demos(self, sample: Sample, n: int, asked: str) -> list[Sample]:
        """The first n of an episode's `demo_ids`, in order; `asked` names the request in the error."""
        if n > len(sample.demo_ids):
            per = f" ({sample.ways} demos a shot)" if sample.ways else ""
            raise ValueError(f"sample {sample.id!r} lists {len(sample.demo_ids)} demo_ids, {asked}{per} asked")
        missing = [i for i in sample.demo_ids[:n] if i not in self.by_id]
        if missing:
            raise ValueError(f"sample {sample.id!r}: demo_ids {missing} are not in the train split")
        return [self.by_id[i] for i in sample.demo_ids[:n]]

    def prepare(self, shared: bool = True) -> None:
        """RICES: the query set's features, computed now. `shared`: every rank calls this (a collective), the ranks
        split the query set's media and all-gather the features."""
        if self.method == "rices" and self._query_features is None:
            self._query_features = self.features.get([s.media[0] for s in self.query_set], shared=shared)

    def select_rices(self, samples: Sequence[Sample], k: int) -> list[list[Sample]]:
        """RICES demos of several samples at once (one similarity matmul), most similar last; a sample's own
        query-set entries (`own`) are passed over."""
        self.prepare(shared=False)  # a caller that skipped prepare(): this process computes them alone
        query = self.features.get([s.media[0] for s in samples])
        from .rices import nearest  # torch: only for RICES

        owns = [self.own(s) for s in samples]
        extra = max(len(own) for own in owns)  # 0 without an overlap: exactly the k nearest
        rows = nearest(query, self._query_features, min(k + extra, len(self.query_set)))
        demos = []
        for sample, row, own in zip(samples, rows, owns):
            kept = [int(i) for i in row if int(i) not in own][-k:] if k else []  # the k most similar, most last
            if len(kept) < k:
                raise ValueError(f"{k} shots asked but the query set holds {len(kept)} samples other than "
                                 f"{sample.id!r}")
            demos.append([self.query_set[i] for i in kept])
        return demos


def prompt_demos(selector: DemoSelector, sample: Sample, index: int, shots: int,
                 zero_shot: str = "text") -> tuple[list[Sample], bool]:
    """(demos, with_media) for a query: `shots` demos with their media, or the zero-shot convention's demos."""
    check_zero_shot(zero_shot)
    if shots > 0:
        return selector.select(sample, index, shots), True
    if zero_shot == "none":
        return [], True
    if sample.demo_ids is not None:  # the first demos of the episode, however many a shot holds
        n = min(ZERO_SHOT_TEXT_DEMOS, len(sample.demo_ids))
        return selector.episode_demos(sample, n, f"{n} text-only demos"), False
    return selector.select(sample, index, min(ZERO_SHOT_TEXT_DEMOS, selector.drawable(sample))), False


def rices_demos(selector: DemoSelector, samples: Sequence[Sample], indices: Sequence[int], shots: int,
                zero_shot: str = "text") -> dict[int, tuple[list[Sample], bool]]:
    """RICES: (demos, with_media) of the queries `samples[i]` for i in `indices` that draw from the query set, found
    together, one `select_rices` (one feature batch, one similarity matmul) per number of demos: `shots`, or at 0
    shots the zero-shot text demos (`prompt_demos`'s, the same per query). Empty where nothing is retrieved: random
    demos, zero-shot "none"; episodes (`demo_ids`) are left to `prompt_demos`."""
    if selector.method != "rices" or (shots == 0 and zero_shot == "none"):
        return {}
    by_k: dict[int, list[int]] = {}  # demos asked -> queries asking them
    for i in indices:
        if samples[i].demo_ids is None:
            k = shots or min(ZERO_SHOT_TEXT_DEMOS, selector.drawable(samples[i]))
            by_k.setdefault(k, []).append(i)
    found: dict[int, tuple[list[Sample], bool]] = {}
    for k, group in by_k.items():
        rows = selector.select_rices([samples[i] for i in group], k) if k else [[] for _ in group]
        found.update((i, (demos, shots > 0)) for i, demos in zip(group, rows))
    return found
