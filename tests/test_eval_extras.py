"""Optional packages of the evaluation: a task whose metric or media need a package that is not installed
(pycocoevalcap, scikit-learn, PyAV) is refused before the model loads, naming the package and the extra that
installs it; without matplotlib the plot alone is skipped, with a warning, and the predictions and results.json are
written. A missing package is simulated with `sys.modules[name] = None` (its import then fails, `find_spec` finds
nothing)."""

import json
import sys

import pytest

from flamingo.cli import main
from flamingo.eval import evaluate
from flamingo.eval.extras import check_requirements
from flamingo.eval.tasks import TASKS, get_task
from flamingo.tiny import tiny_flamingo

from helpers import make_captioning, make_vqa

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = dict(trials=1, batch_size=5, progress=False, generation={"max_new_tokens": 2, "num_beams": 1})


@pytest.fixture(scope="module")
def model_and_processor():
    model, processor = tiny_flamingo()
    return model.eval(), processor


def _never(*args, **kwargs):
    raise AssertionError("called before the missing package was reported")


@pytest.mark.parametrize(
    "task, module, says",
    [
        ("captioning", "pycocoevalcap", "pycocoevalcap (CIDEr): pip install 'flamingo-vlm[eval]'"),
        ("hateful_memes", "sklearn", "scikit-learn (ROC-AUC): pip install 'flamingo-vlm[eval]'"),
        ("videoqa", "av", "av (PyAV: decoding videos): pip install 'flamingo-vlm[video]'"),
        ("videoqa_mc", "av", "av (PyAV: decoding videos): pip install 'flamingo-vlm[video]'"),
        ("video_captioning", "av", "av (PyAV: decoding videos): pip install 'flamingo-vlm[video]'"),
    ],
)
def test_flamingo_eval_refuses_a_missing_package_before_the_model_loads(
    task, module, says, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr("flamingo.convert.auto.load_model", _never)
    monkeypatch.setattr("flamingo.convert.auto.load_processor", _never)
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            "--model",
            str(tmp_path / "model"),
            "--task",
            task,
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"flamingo: error: the {task} task needs {says}"
    assert not out.exists()


def test_video_captioning_names_both_packages_and_both_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(ValueError) as e:
        check_requirements(TASKS["video_captioning"])
    assert str(e.value) == (
        "the video_captioning task needs pycocoevalcap (CIDEr) and av (PyAV: decoding videos): "
        "pip install 'flamingo-vlm[eval,video]'"
    )


def test_evaluate_refuses_a_missing_package_before_any_query(model_and_processor, tmp_path, monkeypatch):
    model, processor = model_and_processor
    data = make_captioning(tmp_path / "data")
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    monkeypatch.setattr("flamingo.eval.runner.predict", _never)
    for task in ("captioning", get_task("captioning")):  # by name, or a Task instance
        with pytest.raises(ValueError, match=r"needs pycocoevalcap \(CIDEr\): pip install 'flamingo-vlm\[eval\]'"):
            evaluate(model, processor, task, str(data), shots=[0], out_dir=str(tmp_path / "out"), **QUICK)
    assert not (tmp_path / "out").exists()


def test_every_task_passes_with_its_packages_installed():
    for task in TASKS.values():
        check_requirements(task)


def test_without_matplotlib_the_plot_alone_is_skipped_with_one_warning(model_and_processor, tmp_path, monkeypatch):
    model, processor = model_and_processor
    data, out = make_vqa(tmp_path / "data"), tmp_path / "out"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning) as caught:
        results = evaluate(model, processor, "vqa", str(data), shots=[0, 1], out_dir=str(out), **QUICK)
    assert [str(w.message) for w in caught if "matplotlib" in str(w.message)] == [
        "matplotlib is not installed: no results.png (the numbers are in results.json and results.md; "
        "pip install 'flamingo-vlm[eval]')"
    ]
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "vqa_0shot_trial0.jsonl",
        "vqa_1shot_trial0.jsonl",
    ]
    assert len((out / "predictions" / "vqa_1shot_trial0.jsonl").read_text().splitlines()) == results["num_samples"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "results.md").exists() and not (out / "results.png").exists()


def test_flamingo_eval_without_matplotlib_prints_the_table_and_exits_0(tmp_path, monkeypatch, capsys):
    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    data, out = make_vqa(tmp_path / "data"), tmp_path / "out"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        code = main(
            [
                "eval",
                "--model",
                str(tmp_path / "model"),
                "--task",
                "vqa",
                "--data",
                str(data),
                "--shots",
                "0",
                "--trials",
                "1",
                "--max-new-tokens",
                "2",
                "--num-beams",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
    assert code == 0
    assert "| vqa_accuracy |" in capsys.readouterr().out
    assert (out / "predictions" / "vqa_0shot_trial0.jsonl").exists() and (out / "results.json").exists()
