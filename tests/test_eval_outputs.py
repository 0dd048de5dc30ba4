"""What `--out` holds: one task's evaluation. A re-run of the task replaces the earlier run's files (its prediction
files of other shots and trials and its plot included), another task's results there are refused before any query,
and a re-run removes only its own task's prediction files."""

import json
import os

import pytest

from flamingo.eval import evaluate
from flamingo.eval.runner import write_results
from flamingo.tiny import tiny_flamingo

from helpers import make_classification, make_vqa

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = dict(batch_size=5, progress=False, generation={"max_new_tokens": 2, "num_beams": 1})


@pytest.fixture(scope="module")
def model_and_processor():
    model, processor = tiny_flamingo()
    return model.eval(), processor


def _predictions(out):
    return sorted(p.name for p in (out / "predictions").iterdir())


def test_a_rerun_of_the_task_replaces_the_earlier_runs_files(model_and_processor, tmp_path):
    model, processor = model_and_processor
    data, out = make_vqa(tmp_path / "data"), tmp_path / "out"
    evaluate(model, processor, "vqa", str(data), shots=[0, 2], trials=2, out_dir=str(out), **QUICK)
    assert len(_predictions(out)) == 4 and (out / "results.png").exists()
    evaluate(model, processor, "vqa", str(data), shots=[0], trials=1, out_dir=str(out), **QUICK)
    assert _predictions(out) == ["vqa_0shot_trial0.jsonl"]  # not the 2-shot / trial-1 files of the first run
    assert json.loads((out / "results.json").read_text())["settings"]["shots"] == [0]
    limit = processor.max_length
    processor.max_length = 5  # every query too long: nothing to plot, and no earlier plot left behind
    try:
        results = evaluate(model, processor, "vqa", str(data), shots=[0], trials=1, out_dir=str(out), **QUICK)
    finally:
        processor.max_length = limit
    assert results["runs"][0]["metrics"] == {} and not (out / "results.png").exists()


def test_an_evaluation_that_stops_keeps_the_runs_it_finished(model_and_processor, tmp_path, monkeypatch):
    """The files were written at the end only: a failure at the last shot count lost every run before it."""
    from flamingo.eval import runner
    from flamingo.hub import eval_results

    model, processor = model_and_processor
    data, out = make_vqa(tmp_path / "data"), tmp_path / "out"
    predict = runner.predict

    def fails_at_two_shots(*args, **kwargs):
        if args[5] == 2:
            raise RuntimeError("out of memory at 2 shots")
        return predict(*args, **kwargs)

    monkeypatch.setattr(runner, "predict", fails_at_two_shots)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate(model, processor, "vqa", str(data), shots=[0, 2], trials=2, out_dir=str(out), **QUICK)
    kept = json.loads((out / "results.json").read_text())
    assert [(r["shots"], r["trial"]) for r in kept["runs"]] == [(0, 0)]
    assert kept["unfinished"] == [{"shots": 2, "trial": 0}, {"shots": 0, "trial": 1}, {"shots": 2, "trial": 1}]
    assert _predictions(out) == ["vqa_0shot_trial0.jsonl"]
    assert "not yet run, 2-shot trial 0, 0-shot trial 1, 2-shot trial 1." in (out / "results.md").read_text()
    with pytest.raises(ValueError, match="did not finish .2-shot trial 0, 0-shot trial 1, 2-shot trial 1 not run"):
        eval_results(str(out))
    monkeypatch.setattr(runner, "predict", predict)
    done = evaluate(model, processor, "vqa", str(data), shots=[0, 2], trials=2, out_dir=str(out), **QUICK)
    assert "unfinished" not in done and json.loads((out / "results.json").read_text()) == done
    assert len(_predictions(out)) == 4 and "Unfinished" not in (out / "results.md").read_text()


def test_each_runs_prediction_file_is_written_once(model_and_processor, tmp_path, monkeypatch):
    """The whole directory was written after every run (each finished run's prediction file again: runs^2 writes);
    a run writes its own prediction file, and the directory at the end is the one of a write at the end only."""
    from flamingo.eval import runner

    model, processor = model_and_processor
    data, out = make_vqa(tmp_path / "data"), tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "vqa_8shot_trial5.jsonl").write_text("{}\n")  # an earlier evaluation's: removed
    written = []
    atomic_file = runner.atomic_file

    def spy(path, *args, **kwargs):
        written.append(os.path.relpath(path, out))
        return atomic_file(path, *args, **kwargs)

    monkeypatch.setattr(runner, "atomic_file", spy)
    results = evaluate(model, processor, "vqa", str(data), shots=[0, 2], trials=2, out_dir=str(out), **QUICK)
    monkeypatch.undo()
    files = [f for f in written if f.startswith("predictions")]
    assert sorted(files) == [f"predictions/vqa_{k}shot_trial{t}.jsonl" for k in (0, 2) for t in (0, 1)]
    assert written.count("results.json") == 4  # the summary after each run
    assert _predictions(out) == [os.path.basename(f) for f in sorted(files)]
    by_run = {(r["shots"], r["trial"]) for r in results["runs"]}
    for k, t in by_run:
        lines = (out / "predictions" / f"vqa_{k}shot_trial{t}.jsonl").read_text().splitlines()
        assert len(lines) == results["num_samples"]
    again = tmp_path / "again"  # the same files as one write of the finished evaluation
    runner.write_results(results, {}, str(again))
    assert (again / "results.json").read_text() == (out / "results.json").read_text()
    assert (again / "results.md").read_text() == (out / "results.md").read_text()


def test_another_tasks_results_in_out_are_refused_before_any_query(model_and_processor, tmp_path, monkeypatch):
    model, processor = model_and_processor
    out, vqa = tmp_path / "out", str(make_vqa(tmp_path / "vqa"))
    evaluate(model, processor, "vqa", vqa, shots=[0], trials=1, out_dir=str(out), **QUICK)
    before = (out / "results.json").read_text()
    ran = []
    monkeypatch.setattr("flamingo.eval.runner.predict", lambda *a, **k: ran.append(1))
    classification = str(make_classification(tmp_path / "cls"))
    with pytest.raises(ValueError, match="holds the results of vqa: choose another out_dir for classification"):
        evaluate(model, processor, "classification", classification, shots=[0], trials=1, out_dir=str(out), **QUICK)
    assert (out / "results.json").read_text() == before
    (out / "results.json").unlink()  # prediction files alone name their task too
    with pytest.raises(ValueError, match="holds the results of vqa"):
        evaluate(model, processor, "classification", classification, shots=[0], trials=1, out_dir=str(out), **QUICK)
    (out / "results.json").write_text("not json")
    with pytest.raises(ValueError, match="is not a results file"):
        evaluate(model, processor, "vqa", vqa, shots=[0], trials=1, out_dir=str(out), **QUICK)
    assert ran == []


def test_a_rerun_removes_only_its_own_tasks_prediction_files(model_and_processor, tmp_path):
    """`multi_image` and `multi_image_plain` (or `videoqa` and `videoqa_mc`) share a prefix: a re-run of one leaves
    the other's files alone."""
    model, processor = model_and_processor
    results = evaluate(model, processor, "vqa", str(make_vqa(tmp_path / "data")), shots=[0], trials=1, **QUICK)
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    for name in ("vqa_4shot_trial1.jsonl", "vqa_mc_0shot_trial0.jsonl", "notes.txt"):
        (out / "predictions" / name).write_text("{}\n")
    write_results(results, {(0, 0): [{"id": "1"}]}, str(out))
    assert _predictions(out) == ["notes.txt", "vqa_0shot_trial0.jsonl", "vqa_mc_0shot_trial0.jsonl"]


def test_results_name_the_directory_the_model_was_loaded_from(model_and_processor, tmp_path):
    """`evaluate` of `load_pretrained(d)` from Python (docs/eval.md) labels results.json and results.md with `d`, not
    the frozen LM's name (or "flamingo"): two trained models on one LM get two labels. `model_name=` still wins."""
    from flamingo.build import load_pretrained

    model, processor = model_and_processor
    saved = str(tmp_path / "runs" / "ckpt")
    model.save_pretrained(saved, processor=processor)
    loaded, loaded_processor = load_pretrained(saved)
    assert loaded.name_or_path == saved and model.name_or_path is None
    data, out = str(make_vqa(tmp_path / "data")), tmp_path / "out"
    results = evaluate(loaded, loaded_processor, "vqa", data, shots=[0], trials=1, out_dir=str(out), **QUICK)
    assert results["model"] == saved == json.loads((out / "results.json").read_text())["model"]
    assert (out / "results.md").read_text().startswith(f"# vqa — {saved}")
    named = evaluate(loaded, loaded_processor, "vqa", data, shots=[0], trials=1, model_name="mine", **QUICK)
    assert named["model"] == "mine"


def test_results_record_a_local_dataset_by_its_absolute_path(model_and_processor, tmp_path, monkeypatch):
    """`--data okvqa` from /data and `--data /data/okvqa` are one folder: results.json records it absolute both ways,
    so `flamingo push --results` files the two runs under one dataset (named by its folder alone)."""
    from flamingo.hub import _results

    model, processor = model_and_processor
    data = make_vqa(tmp_path / "okvqa")
    monkeypatch.chdir(tmp_path)
    evaluate(model, processor, "vqa", "okvqa", shots=[0], trials=1, out_dir=str(tmp_path / "e0"), **QUICK)
    evaluate(model, processor, "vqa", str(data) + "/", shots=[2], trials=1, out_dir=str(tmp_path / "e2"), **QUICK)
    recorded = [json.loads((tmp_path / e / "results.json").read_text())["data"] for e in ("e0", "e2")]
    assert recorded == [str(data), str(data)]
    _, entries = _results([str(tmp_path / "e0"), str(tmp_path / "e2")])
    assert {(e.dataset_name, e.metric_name) for e in entries} == {
        ("okvqa", "vqa_accuracy (0-shot)"), ("okvqa", "vqa_accuracy (2-shot)")}


def test_results_record_the_weights_the_model_was_evaluated_with(tmp_path):
    """A float and a bf16 (or quantized) evaluation of one model are told apart by their results.json."""
    import torch

    model, processor = tiny_flamingo()
    data = make_vqa(tmp_path / "data")
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        results = evaluate(model.to(dtype).eval(), processor, "vqa", str(data), shots=[0], trials=1,
                           out_dir=str(tmp_path / name), **QUICK)
        assert (results["settings"]["dtype"], results["settings"]["quantize_frozen"]) == (name, "none")


def test_a_run_killed_while_writing_results_leaves_the_earlier_ones_whole(model_and_processor, tmp_path,
                                                                          monkeypatch):
    """Every file of the results is written whole or not at all: a run killed half way through results.json left a
    cut file, and the same command run again refused the directory as 'not a results file of flamingo eval'."""
    model, processor = model_and_processor
    data, out = make_vqa(tmp_path / "data"), tmp_path / "out"
    evaluate(model, processor, "vqa", str(data), shots=[0], trials=1, out_dir=str(out), **QUICK)
    before = (out / "results.json").read_text()

    def killed(obj, f, **kwargs):
        f.write(json.dumps(obj)[:100])
        raise KeyboardInterrupt  # as a kill half way

    monkeypatch.setattr(json, "dump", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, processor, "vqa", str(data), shots=[0], trials=1, out_dir=str(out), **QUICK)
    monkeypatch.undo()
    assert (out / "results.json").read_text() == before
    evaluate(model, processor, "vqa", str(data), shots=[0], trials=1, out_dir=str(out), **QUICK)  # the retry
