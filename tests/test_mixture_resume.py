"""`WeightedMixture.load_state_dict` with other sources than its state was saved with: the sources it shares go on
from their saved positions, an added one starts its first epoch, a removed one is dropped (as the trainer resumes a
run whose datasets changed)."""

import pytest

from flamingo.data import WeightedMixture
from flamingo.data.mixture import next_batch


class Counting:
    """A source of batches `(name, epoch, index)`, `size` per epoch, resumable as a `DatasetSource` is."""

    def __init__(self, name: str, size: int = 5) -> None:
        self.name, self.size, self.epoch, self.pos = name, size, 0, 0

    def __iter__(self):
        while self.pos < self.size:
            self.pos += 1
            yield (self.name, self.epoch, self.pos - 1)
        self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]


def _mixture(names, seed=0):
    return WeightedMixture({n: Counting(n) for n in names}, {n: 1.0 for n in names}, seed=seed)


def _after(state, name):
    """The batches `name` gives next from its saved state, in order."""
    source = Counting(name)
    source.load_state_dict(state["sources"][name])
    iterators: dict = {}
    return [next_batch({name: source}, iterators, name) for _ in range(3)]  # into its next epoch where it ends


@pytest.fixture
def saved():
    mixture = _mixture(["a", "b"])
    drawn = [next(mixture) for _ in range(7)]
    assert {name for name, _ in drawn} == {"a", "b"}  # both read: their positions are not the start
    return mixture.state_dict()


@pytest.mark.parametrize("names", [["a", "b", "c"], ["a"]], ids=["added", "removed"])
def test_a_changed_mixture_resumes_the_sources_it_shares(saved, names):
    mixture = _mixture(names, seed=1)
    with pytest.warns(
        UserWarning, match=r"\['c'\] start from their beginning" if "c" in names else r"\['b'\] are no longer read"
    ):
        mixture.load_state_dict(saved)
    batches: dict[str, list] = {n: [] for n in names}
    while any(len(b) < 3 for b in batches.values()):
        name, batch = next(mixture)
        batches[name].append(batch)
    for name in set(names) & {"a", "b"}:
        assert batches[name][:3] == _after(saved, name)  # where it was
    if "c" in names:
        assert batches["c"][:3] == [("c", 0, 0), ("c", 0, 1), ("c", 0, 2)]  # its first epoch, from its start
    assert set(mixture.state_dict()["sources"]) == set(names)


def test_the_same_mixture_resumes_exactly_without_a_warning(saved, recwarn):
    original = _mixture(["a", "b"])
    for _ in range(7):
        next(original)
    resumed = _mixture(["a", "b"])
    resumed.load_state_dict(saved)
    assert [next(resumed) for _ in range(20)] == [next(original) for _ in range(20)]
    assert not [w for w in recwarn if "WeightedMixture" in str(w.message)]
