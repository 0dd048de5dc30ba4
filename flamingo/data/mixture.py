"""`WeightedMixture`: the `sample` mixture mode stand-alone — each step draws one dataset with probability ∝ weight.

The trainer's default (`accumulate`, the paper's) takes one batch of every dataset per step and weights the losses;
this iterator is for scripts and tools that want one stream of batches from several sources.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Mapping


class WeightedMixture:
    """Endless (name, batch) pairs from `sources`, drawing a source by `weights` with a seeded RNG.

    A source that reaches the end of an epoch is re-iterated (its next epoch). `state_dict()` holds the RNG state and
    every source's own state, so a mixture resumes exactly.
    """

    def __init__(self, sources: Mapping[str, Any], weights: Mapping[str, float], seed: int = 0) -> None:
        missing = set(sources) - set(weights)
        if missing:
            raise ValueError(f"no weight for sources {sorted(missing)}")
        if any(weights[n] < 0 for n in sources) or not any(weights[n] > 0 for n in sources):
            raise ValueError(f"weights must be >= 0 with at least one > 0, got {dict(weights)}")
        self.sources = dict(sources)
        self.names = list(sources)
        self.weights = [float(weights[n]) for n in self.names]
        self.rng = random.Random(seed)
        self._iterators: dict[str, Iterator[dict[str, Any]]] = {}

    def _next(self, name: str) -> dict[str, Any]:
        if name not in self._iterators:
            self._iterators[name] = iter(self.sources[name])
        try:
            return next(self._iterators[name])
        except StopIteration:
            self._iterators[name] = iter(self.sources[name])
            return next(self._iterators[name])

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return self

    def __next__(self) -> tuple[str, dict[str, Any]]:
        name = self.rng.choices(self.names, weights=self.weights)[0]
        return name, self._next(name)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "sources": {n: s.state_dict() for n, s in self.sources.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rng_state = state["rng"]
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        for name, source in self.sources.items():
            source.load_state_dict(state["sources"][name])
        self._iterators.clear()
