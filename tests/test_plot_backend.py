"""What the library's pictures and progress bars leave behind in a long-lived process (a notebook's kernel).

Pictures: loss.png, gates.png (train/plots.py) and results.png (eval/runner.py) are drawn on figures made outside
pyplot (runtime/plotting.py), so the backend the user chose (`%matplotlib inline`: a `module://` backend, stood in
for here by a small one written to tmp_path) and the user's open figures are left as they were.
Progress bars: a pass that raises (an interrupted cell) closes its bar, so no dead bar stays registered with tqdm
(each later bar would be drawn one line lower, under a redrawn dead one)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import torch
from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

import flamingo.eval.rices as rices_module
import flamingo.eval.runner as runner
import flamingo.serve.batch as batch_module
from flamingo.eval import evaluate
from flamingo.tiny import tiny_flamingo
from flamingo.train.plots import plot_run
from flamingo.train.validation import Validation

from helpers import make_vqa

BACKEND = '''"""A notebook's display backend, as `%matplotlib inline` selects one: Agg drawing, no window."""
from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

FigureCanvas = FigureCanvasAgg
FigureManager = FigureManagerBase
'''
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def users_figure(tmp_path, monkeypatch):
    """The user's backend selected and one of their figures open (the process's own backend restored after)."""
    import matplotlib
    import matplotlib.pyplot as plt

    (tmp_path / "notebook_backend.py").write_text(BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = matplotlib.get_backend()
    matplotlib.use("module://notebook_backend")
    fig = plt.figure()
    yield fig
    plt.close(fig)
    matplotlib.use(before)


def test_the_plots_leave_the_users_backend_and_figures_alone(users_figure, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    run, out = tmp_path / "run", tmp_path / "eval"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for s in (1, 2, 3):
            f.write(
                json.dumps(
                    {"step": s, "loss": 3.0 - s / 10, "loss/pairs": 3.0 - s / 10, "gates": {"0": [s / 10, -s / 10]}}
                )
                + "\n"
            )
        f.write(json.dumps({"step": 3, "val_loss/held_out": 2.8}) + "\n")
    summary = [{"metric": "accuracy", "shots": k, "mean": 10.0 + k, "std": 1.0} for k in (0, 4)]
    results = {
        "task": "vqa",
        "model": "tiny",
        "num_samples": 5,
        "date": "-",
        "summary": summary,
        "runs": [{"shots": k} for k in (0, 4)],
        "settings": {"trials": 1, "seed": 0, "demos": "random", "zero_shot": "text"},
    }

    written = plot_run(str(run), title="run")
    runner.write_results(results, {}, str(out))

    assert matplotlib.get_backend() == "module://notebook_backend"
    assert plt.get_fignums() == [users_figure.number]
    assert written == [str(run / "loss.png"), str(run / "gates.png")]
    for path in [*written, out / "results.png"]:
        with open(path, "rb") as f:
            assert f.read(8) == PNG


def _open_bars(desc: str, caught: pytest.ExceptionInfo) -> list:
    """Bars tqdm still holds as open whose description starts with `desc`, counted while the error that ended their
    pass is kept with its traceback (as IPython keeps the last one in `sys.last_traceback`): a dropped bar would be
    closed by the garbage collector."""
    assert caught.tb is not None
    bars = set(getattr(std_tqdm, "_instances", ())) | set(getattr(auto_tqdm, "_instances", ()))
    return [bar for bar in bars if str(bar.desc).startswith(desc)]


def _raise_on_call(n: int, real, error: type[BaseException] = KeyboardInterrupt):
    """`real`, raising `error` at its n-th call instead (a Ctrl-C or a failure midway through a pass)."""
    calls = []

    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error("interrupted")
        return real(*args, **kwargs)

    return call


def test_an_interrupted_evaluation_closes_its_bar(tmp_path, monkeypatch, one_thread):
    model, processor = tiny_flamingo()
    monkeypatch.setattr(runner, "generate_batch", _raise_on_call(2, runner.generate_batch))
    with pytest.raises(KeyboardInterrupt) as caught:
        evaluate(
            model.eval(),
            processor,
            "vqa",
            str(make_vqa(tmp_path / "data")),
            shots=[0],
            trials=1,
            batch_size=2,
            progress=True,
            generation={"max_new_tokens": 2, "num_beams": 1},
        )
    assert _open_bars("vqa", caught) == []


class _Source:
    """A validation set of `n` batches (a DatasetSource's iteration and state, no data)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        return iter([{"input_ids": torch.zeros(1, 2)}] * self.n)


def test_an_interrupted_validation_closes_its_bar():
    batch_loss = _raise_on_call(2, lambda batch: (torch.tensor(1.0), torch.tensor(2)))
    validation = Validation({"held_out": _Source(3)}, progress=True)
    with pytest.raises(KeyboardInterrupt) as caught:
        validation.run(batch_loss, torch.device("cpu"))
    assert _open_bars("validate held_out", caught) == []


def test_rices_features_that_fail_close_their_bar(monkeypatch):
    features = _raise_on_call(2, lambda model, media, batch_size: [torch.zeros(3) for _ in media], RuntimeError)
    monkeypatch.setattr(rices_module, "pooled_features", features)
    load = SimpleNamespace(try_load=lambda path, keep: path)
    cache = rices_module.FeatureCache(None, load, batch_size=1, progress=True)
    with pytest.raises(RuntimeError) as caught:
        cache._encode([(j, f"image{j}.png") for j in range(3)])
    assert _open_bars("RICES features", caught) == []


class _Client:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


def test_a_failed_batch_file_closes_its_bar(monkeypatch):
    async def fail(client, lines, concurrency, *, on_answer, batch):
        on_answer(0, None)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(batch_module, "create_app", lambda engine, settings: None)
    monkeypatch.setattr(batch_module, "app_client", lambda app, api_key: _Client())
    monkeypatch.setattr(batch_module, "send_all", fail)
    lines = [SimpleNamespace(request={}), SimpleNamespace(request={})]
    with pytest.raises(RuntimeError) as caught:
        asyncio.run(batch_module._run(None, SimpleNamespace(api_key=None), lines, 1, True, "in.jsonl"))
    assert _open_bars("batch", caught) == []
