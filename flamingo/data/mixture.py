"""Drawing datasets by weight: `MixtureSampler` (the one sampler of the package) and `WeightedMixture` (a stream of
batches built on it).

The trainer's `sample` mixture mode draws each step's dataset with a `MixtureSampler`; its default (`accumulate`,
the paper's) takes one batch of every dataset of weight > 0 per step and weights the losses (neither mode reads a
dataset of weight 0). `WeightedMixture` is the `sample` mode stand-alone, for scripts and tools that want one
stream of batches from several sources.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterator, Mapping, MutableMapping

import torch


class MixtureSampler:
    """Draws one name per call with probability ∝ its weight, from its own seeded `torch.Generator`.

    A draw is `torch.multinomial(weights, 1)` over the names in the order given; `state_dict()` holds the
    generator's state as plain data (a list of bytes), so a run resumes with the same sequence of draws.
    """

    def __init__(self, weights: Mapping[str, float], seed: int) -> None:
        values = [float(w) for w in weights.values()]
        if not values or not all(math.isfinite(w) and w >= 0 for w in values) or not any(w > 0 for w in values):
            raise ValueError(f"mixture weights must be finite numbers >= 0 with at least one > 0, got {dict(weights)}")
        self.names = list(weights)
        self.weights = torch.tensor(values)  # (D,) float32
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self) -> str:
        return self.names[int(torch.multinomial(self.weights, 1, generator=self.generator))]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


def next_batch(sources: Mapping[str, Any], iterators: MutableMapping[str, Iterator[Any]], name: str) -> Any:
    """The next batch of `sources[name]`, iterated through `iterators[name]`; when an epoch ends the source is
    iterated again (its next epoch: a source reshuffles by its own epoch count)."""
    if name not in iterators:
        iterators[name] = iter(sources[name])
    try:
        return next(iterators[name])
    except StopIteration:
        iterators[name] = iter(sources[name])
        return next(iterators[name])


def close_iterators(iterators: MutableMapping[str, Iterator[Any]]) -> None:
    """Close the sources' iterators (a stream's generator closes its shards) and forget them."""
    for iterator in iterators.values():
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    iterators.clear()


class WeightedMixture:
    """Endless (name, batch) pairs from `sources`, drawing a source by `weights` with a `MixtureSampler`.

    A source that reaches the end of an epoch is re-iterated (its next epoch). `state_dict()` holds the sampler's
    state and every source's own state, so a mixture of the same sources (same names, order and weights) resumes
    exactly. See `load_state_dict` for a mixture whose sources changed since.
    """

    def __init__(self, sources: Mapping[str, Any], weights: Mapping[str, float], seed: int = 0) -> None:
        missing, unknown = set(sources) - set(weights), set(weights) - set(sources)
        if missing or unknown:  # a misspelt name would otherwise leave its weight unused, silently
            raise ValueError(f"the weights must name the sources {sorted(sources)} exactly: "
                             + "; ".join(([f"no weight for {sorted(missing)}"] if missing else [])
                                         + ([f"no source {sorted(unknown)}"] if unknown else [])))
        self.sources = dict(sources)
        self.sampler = MixtureSampler({n: weights[n] for n in self.sources}, seed)
        self._iterators: dict[str, Iterator[dict[str, Any]]] = {}

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return self

    def __next__(self) -> tuple[str, dict[str, Any]]:
        name = self.sampler.draw()
        return name, next_batch(self.sources, self._iterators, name)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "sources": {n: s.state_dict() for n, s in self.sources.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state`, as the trainer resumes a run whose datasets changed (a new name is a new source): a
        source the state names goes on from its saved position, one it lacks (added since) is left as it is (a source
        just built: its first epoch), and a saved source this mixture no longer has is dropped; either change is
        warned about, naming the sources.

        The sampler goes on from its saved generator state in every case. Its draws are then not those of either
        mixture: a draw maps the generator's numbers to this mixture's names and weights, and consumes numbers per
        source (`torch.multinomial`), so with other sources (or another order or other weights) the sequence of
        draws is a new one, still drawn by this mixture's weights. Reseeding would replay the draws of a fresh
        mixture instead, which is no nearer an exact resume."""
        saved = state["sources"]
        added, dropped = sorted(set(self.sources) - set(saved)), sorted(set(saved) - set(self.sources))
        if added or dropped:
            changes = (([f"{added} start from their beginning"] if added else [])
                       + ([f"{dropped} are no longer read"] if dropped else []))
            warnings.warn(f"resuming a WeightedMixture with other sources than its state was saved with: "
                          f"{', '.join(changes)} (the others go on from their saved positions)", stacklevel=2)
        self.sampler.load_state_dict(state["sampler"])
        for name, source in self.sources.items():
            if name in saved:
                source.load_state_dict(saved[name])
        self._iterators.clear()
