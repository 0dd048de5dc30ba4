"""Every task through `evaluate` on a tiny fixture dataset with a tiny saved model: results.json, results.md, the PNG
and one prediction record per sample; episodes pick exactly their demo_ids; batching and the vision cache change no
prediction; the `flamingo eval` subcommand; bad inputs are refused."""

import argparse
import json
import os
import string
import warnings

import pytest

from flamingo import load_pretrained
from flamingo.build import flamingo_processor
from flamingo.chat import OTTER_ANSWER, ChatFormat, IdeficsChat, OtterChat
from flamingo.config import END_OF_UTTERANCE
from flamingo.eval import evaluate
from flamingo.eval.cli import add_eval_subcommand
from flamingo.eval.predict import build_prompt, continuation_ids_of
from flamingo.eval.task import Sample
from flamingo.eval.tasks import TASKS, get_task
from flamingo.tiny import (
    random_image,
    tiny_flamingo,
    tiny_image_processor,
)

from helpers import (
    DATASET_MAKERS,
    TEST_SAMPLES,
    hub_cache_entry,
    make_captioning,
    make_classification,
    make_vqa,
    write_json,
    write_jsonl,
)

FAST = dict(shots=[0, 2], trials=2, batch_size=2, progress=False, cider_tokenizer="python",
            generation={"max_new_tokens": 3, "num_beams": 2})


# ------------------------------------------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model, processor = tiny_flamingo()
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(str(directory), processor=processor)
    return str(directory)


@pytest.fixture(scope="module")
def model_and_processor(saved_model):
    return load_pretrained(saved_model)


# --------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("task", list(DATASET_MAKERS))
def test_every_task_writes_results_and_one_record_per_sample_with_its_demos(task, model_and_processor, tmp_path):
    model, processor = model_and_processor
    data = DATASET_MAKERS[task](tmp_path / "data")
    out = tmp_path / "out"
    results = evaluate(model, processor, task, str(data), out_dir=str(out), model_name="tiny", seed=3, **FAST)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert (out / "results.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| 0-shot | 2-shot |" in table
    n_test = TEST_SAMPLES[task]
    assert len(results["runs"]) == 4 and results["num_samples"] == n_test
    for run in results["runs"]:
        assert {"task", "model", "date", "num_samples", "shots", "trial", "seed", "metrics"} <= set(run)
        assert run["task"] == task and run["model"] == "tiny" and run["seed"] == 3 + run["trial"]
        for value in run["metrics"].values():
            assert value is None or 0.0 <= value <= 1000.0
    for row in results["summary"]:
        assert row["metric"] in table and len(row["values"]) == 2
    if task in ("captioning", "video_captioning"):
        assert results["tokenizer"] == "python"
    # every evaluated sample once, with the right number of demos (0-shot: 2 text-only demos)
    records = [json.loads(line) for line in (out / "predictions" / f"{task}_2shot_trial1.jsonl").open()]
    assert len(records) == n_test and len({r["id"] for r in records}) == n_test
    assert all(len(r["demo_ids"]) == 2 for r in records)


def test_episodes_use_exactly_their_demo_ids(model_and_processor, tmp_path):
    model, processor = model_and_processor
    data = make_vqa(tmp_path / "data", episodes=True)
    evaluate(model, processor, "vqa", str(data), shots=[1, 3], trials=1, batch_size=3, progress=False,
             out_dir=str(tmp_path / "out"), generation={"max_new_tokens": 2, "num_beams": 1})
    test = json.loads((data / "test_questions.json").read_text())["questions"]
    listed = {str(q["question_id"]): [str(i) for i in q["demo_ids"]] for q in test}
    for k in (1, 3):
        for line in (tmp_path / "out" / "predictions" / f"vqa_{k}shot_trial0.jsonl").open():
            record = json.loads(line)
            assert record["demo_ids"] == listed[record["id"]][:k]


def test_n_way_episodes_take_a_demo_of_each_class_per_shot(model_and_processor, tmp_path):
    """Classification JSONL with `ways` (the binding task's layout): k shots are the first k * ways demo_ids."""
    model, processor = model_and_processor
    data = make_classification(tmp_path / "data")
    rows = [json.loads(line) for line in (data / "test.jsonl").open()]
    for j, row in enumerate(rows):
        row.update(candidates=["cat", "dog"], label=["cat", "dog"][j % 2], ways=2,
                   demo_ids=[f"s{(j + i) % 5}" for i in range(4)])
    write_jsonl(data / "test.jsonl", rows)
    evaluate(model, processor, "classification", str(data), shots=[0, 1, 2], trials=1, batch_size=2, progress=False,
             out_dir=str(tmp_path / "out"))
    listed = {row["id"]: row["demo_ids"] for row in rows}
    for k, n in ((0, 2), (1, 2), (2, 4)):  # 0 shots: the two text-only demos of the zero-shot convention
        records = [json.loads(line) for line in
                   (tmp_path / "out" / "predictions" / f"classification_{k}shot_trial0.jsonl").open()]
        assert len(records) == len(rows) and all(r["demo_ids"] == listed[r["id"]][:n] for r in records)
    with pytest.raises(ValueError, match="2 demos a shot"):
        evaluate(model, processor, "classification", str(data), shots=[3], trials=1, progress=False)


def test_every_episode_loader_reads_ways(tmp_path):
    """`ways` is part of the episode format of every task whose records list `demo_ids` (Frozen's Fast-VQA is a
    2-way VQA episode); a bad value is a clear error at load time."""
    data = make_vqa(tmp_path / "data", episodes=True)
    path = data / "test_questions.json"
    questions = json.loads(path.read_text())["questions"]
    for q in questions:
        q["ways"] = 3
    write_json(path, {"questions": questions})
    samples = get_task("vqa").load(str(data), "test")
    assert [s.ways for s in samples] == [3] * len(questions) and all(len(s.demo_ids) == 3 for s in samples)
    questions[0]["ways"] = 0
    write_json(path, {"questions": questions})
    with pytest.raises(ValueError, match="'ways' must be a positive integer"):
        get_task("vqa").load(str(data), "test")


@pytest.mark.parametrize("task", ["vqa", "classification"])
def test_batched_predictions_equal_one_prompt_at_a_time(task, model_and_processor, tmp_path):
    """Generation (vqa) and ranking (classification: `score_batch` over left-padded prompts) in batches of 4 give
    the predictions of one prompt at a time."""
    model, processor = model_and_processor
    data = DATASET_MAKERS[task](tmp_path / "data")
    common = dict(shots=[2], trials=1, progress=False, generation={"max_new_tokens": 4, "num_beams": 1})
    evaluate(model, processor, task, str(data), batch_size=4, out_dir=str(tmp_path / "a"), **common)
    evaluate(model, processor, task, str(data), batch_size=1, out_dir=str(tmp_path / "b"), **common)
    read = lambda d: (tmp_path / d / "predictions" / f"{task}_2shot_trial0.jsonl").read_text()  # noqa: E731
    assert read("a") == read("b")


@pytest.mark.parametrize("task", ["vqa", "classification", "videoqa"])
def test_vision_cache_encodes_each_frame_once_and_changes_no_prediction(task, model_and_processor, tmp_path):
    model, processor = model_and_processor
    data = DATASET_MAKERS[task](tmp_path / "data")
    frames = []
    hook = model.vision.register_forward_hook(lambda m, args, out: frames.append(out.last_hidden_state.shape[0]))
    common = dict(shots=[1, 2], trials=2, progress=False, generation={"max_new_tokens": 4, "num_beams": 1})
    try:
        evaluate(model, processor, task, str(data), out_dir=str(tmp_path / "off"), vision_cache_mb=0, **common)
        uncached, frames[:] = sum(frames), []
        evaluate(model, processor, task, str(data), out_dir=str(tmp_path / "on"), **common)
        cached = sum(frames)
    finally:
        hook.remove()
    distinct = set()
    for split in ("train", "test"):
        for sample in get_task(task).load(str(data), split):
            for medium in sample.media:
                for frame in processor.preprocess_media(medium):
                    distinct.add(frame.numpy().tobytes())
    assert cached <= len(distinct) < uncached  # each distinct frame at most once (some demos are never drawn)
    for name in sorted(os.listdir(tmp_path / "off" / "predictions")):
        off = [json.loads(line) for line in (tmp_path / "off" / "predictions" / name).open()]
        on = [json.loads(line) for line in (tmp_path / "on" / "predictions" / name).open()]
        assert on == off


def test_eval_subcommand_writes_results_and_prints_the_summary_as_json(saved_model, tmp_path, capsys):
    data = make_classification(tmp_path / "data")
    parser = argparse.ArgumentParser()
    add_eval_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", saved_model, "--task", "classification", "--data", str(data),
                              "--shots", "0", "1", "--trials", "1", "--demos", "rices", "--query-set", "all",
                              "--out", str(tmp_path / "out"), "--no-progress"])
    assert args.func(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["demos"] == "rices" and results["settings"]["query_set"] == 5  # the 5 train images
    assert results["model"] == saved_model
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
    assert summary == {f"{r['metric']}@{r['shots']}": r["mean"] for r in results["summary"]}
    assert set(summary) == {"top1_accuracy@0", "top1_accuracy@1", "top5_accuracy@0", "top5_accuracy@1"}


def test_evaluate_refuses_unknown_task_too_many_shots_missing_files_and_bad_template(model_and_processor, tmp_path):
    model, processor = model_and_processor
    data = make_vqa(tmp_path / "data")
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(model, processor, "nope", str(data))
    with pytest.raises(ValueError, match="shots"):
        evaluate(model, processor, "vqa", str(data), shots=[6], trials=1, progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate(model, processor, "captioning", str(data), shots=[0], trials=1, progress=False)
    with pytest.raises(ValueError, match="answer"):
        evaluate(model, processor, "vqa", str(data), template="<image>Q:{question}", progress=False)


QUICK = dict(shots=[0], trials=1, progress=False, generation={"max_new_tokens": 2, "num_beams": 1})


def test_evaluate_refuses_settings_below_one_by_name(model_and_processor, tmp_path):
    """A batch size, query set or generation setting below 1 is refused with a message naming it (not `range()`'s,
    numpy's or transformers' error from deep inside, nor a RuntimeError about samples missing after gathering)."""
    model, processor = model_and_processor
    data = make_vqa(tmp_path / "data")
    for size in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            evaluate(model, processor, "vqa", str(data), **{**QUICK, "batch_size": size})
    with pytest.raises(ValueError, match="query_set must be >= 1"):
        evaluate(model, processor, "vqa", str(data), query_set=-1, **QUICK)
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        evaluate(model, processor, "vqa", str(data), **{**QUICK, "generation": {"num_beams": 0}})
    with pytest.raises(ValueError, match="seed must be >= 0"):
        evaluate(model, processor, "vqa", str(data), seed=-1, **QUICK)


def test_evaluate_refuses_an_out_path_that_is_a_file_before_any_query(model_and_processor, tmp_path):
    """`--out` naming a file fails at the start, not in `mkdir` after every query ran; so do more shots than the
    query set holds, not after the smaller shots ran."""
    model, processor = model_and_processor
    data = make_vqa(tmp_path / "data")
    (tmp_path / "taken").write_text("a file")
    calls = []
    generate = model.generate
    model.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    try:
        with pytest.raises(ValueError, match="is a file, not a directory"):
            evaluate(model, processor, "vqa", str(data), out_dir=str(tmp_path / "taken"), **QUICK)
        with pytest.raises(ValueError, match="names no directory"):  # `--out ""`: not the working directory
            evaluate(model, processor, "vqa", str(data), out_dir="", **QUICK)
        with pytest.raises(ValueError, match="shots asked, but the query set holds 2 demos"):
            evaluate(model, processor, "vqa", str(data), **{**QUICK, "shots": [0, 8]}, query_set=2)
    finally:
        del model.generate
    assert calls == []  # refused before the first query (the 0-shot run did not start either)


def test_evaluate_names_the_split_or_file_and_the_field_a_record_lacks(model_and_processor, tmp_path):
    """A record without a field its task reads, or a file that is not JSON: a ValueError naming the split or the file
    (not a bare KeyError from the loader, nor json's message alone)."""
    model, processor = model_and_processor
    data = make_vqa(tmp_path / "data")
    path = data / "test_questions.json"
    questions = json.loads(path.read_text())["questions"]
    del questions[1]["question"]
    write_json(path, {"questions": questions})
    with pytest.raises(ValueError, match="vqa: a record of the test split .* lacks the field 'question'"):
        evaluate(model, processor, "vqa", str(data), **QUICK)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="test_questions.json.* is not JSON"):
        evaluate(model, processor, "vqa", str(data), **QUICK)
    rows = [json.loads(line) for line in (make_classification(tmp_path / "cls") / "test.jsonl").open()]
    del rows[0]["label"]  # an unlabelled split (a benchmark's withheld test set)
    write_jsonl(tmp_path / "cls" / "test.jsonl", rows)
    with pytest.raises(ValueError, match="classification: a record of the test split .* lacks the field 'label'"):
        evaluate(model, processor, "classification", str(tmp_path / "cls"), **QUICK)
    (tmp_path / "cls" / "test.jsonl").write_text(json.dumps(rows[1]) + "\n{oops\n")
    with pytest.raises(ValueError, match="test.jsonl.* line 2 is not JSON"):
        evaluate(model, processor, "classification", str(tmp_path / "cls"), **QUICK)
    for row, among in (({**rows[1], "label": "zebra"}, "classes.json"),  # scored wrong, unseen, before
                       ({**rows[1], "candidates": ["cat", "red bird"]}, "the record")):
        write_jsonl(tmp_path / "cls" / "test.jsonl", [row])
        with pytest.raises(ValueError, match=f"record 's11': its label .* is not among its candidates \\({among}"):
            evaluate(model, processor, "classification", str(tmp_path / "cls"), **QUICK)


def test_evaluate_names_a_template_field_the_samples_lack(model_and_processor, tmp_path):
    """`--template` with a typo in a field (`{quest}` for `{question}`) is refused before any prompt, naming the
    field and the fields the samples have (not a KeyError from `str.format`)."""
    model, processor = model_and_processor
    data = make_vqa(tmp_path / "data")
    with pytest.raises(ValueError, match=r"names \{quest\}.*\['question'\]"):
        evaluate(model, processor, "vqa", str(data), template="<image>Q:{quest} A:{answer}", **QUICK)
    with pytest.raises(ValueError, match=r"names \{0\}"):
        evaluate(model, processor, "vqa", str(data), template="<image>Q:{0} A:{answer}", **QUICK)


def test_evaluate_refuses_duplicate_test_ids(model_and_processor, tmp_path):
    """CIDEr is computed over predictions keyed by sample id: two test samples with one id would be scored as one, so
    the metric would silently cover fewer samples than `num_samples` says. Such a split is refused."""
    model, processor = model_and_processor
    data = make_captioning(tmp_path / "data")
    path = data / "captions.json"
    images = json.loads(path.read_text())["images"]
    for image in images:
        if image["split"] == "test":
            image["cocoid"] = 4  # three test images, one id
    write_json(path, {"images": images})
    with pytest.raises(ValueError, match="duplicate sample ids.*'4'"):
        evaluate(model, processor, "captioning", str(data), shots=[0], trials=1, progress=False,
                 cider_tokenizer="python", generation={"max_new_tokens": 2, "num_beams": 1})


def test_a_hub_dataset_evaluates_as_its_local_copy(saved_model, model_and_processor, tmp_path):
    """`--data hf://datasets/ORG/NAME/FOLDER`: the folder of the dataset's snapshot (here a hub cache stand-in read
    offline in a fresh process, the local copy removed) gives the local directory's predictions."""
    import shutil
    import subprocess
    import sys

    model, processor = model_and_processor
    make_vqa(tmp_path / "repo" / "vqa")
    evaluate(model, processor, "vqa", str(tmp_path / "repo" / "vqa"), seed=3, out_dir=str(tmp_path / "local"), **FAST)
    cache = tmp_path / "hf" / "hub"
    hub_cache_entry(cache, "someone/evalsets", tmp_path / "repo", repo_type="dataset")
    shutil.rmtree(tmp_path / "repo")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    code = (f"from flamingo import load_pretrained; from flamingo.eval import evaluate; "
            f"m, p = load_pretrained({saved_model!r}); "
            f"evaluate(m, p, 'vqa', 'hf://datasets/someone/evalsets/vqa', seed=3, out_dir={str(tmp_path / 'hub')!r}, "
            f"**{FAST!r})")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "local" / "predictions").iterdir())
    assert files and files == sorted(p.name for p in (tmp_path / "hub" / "predictions").iterdir())
    for name in files:
        assert (tmp_path / "hub" / "predictions" / name).read_text() == \
            (tmp_path / "local" / "predictions" / name).read_text()
    assert json.loads((tmp_path / "hub" / "results.json").read_text())["data"] == "hf://datasets/someone/evalsets/vqa"


def test_shots_are_run_once_each_in_increasing_order(model_and_processor, tmp_path):
    """`--shots 2 0 2`: 0 and 2 shots, one run per trial each, so a summary row has one value per trial."""
    model, processor = model_and_processor
    data = make_classification(tmp_path / "data")
    results = evaluate(model, processor, "classification", str(data), shots=[2, 0, 2], trials=2, batch_size=3,
                       progress=False)
    assert results["settings"]["shots"] == [0, 2]
    assert [(r["shots"], r["trial"]) for r in results["runs"]] == [(0, 0), (2, 0), (0, 1), (2, 1)]
    assert all(len(row["values"]) == 2 and row["seeds"] == [0, 1] for row in results["summary"])


def test_no_demos_need_no_train_split(model_and_processor, tmp_path):
    """`--shots 0 --zero-shot none` draws no demo: a test-only download evaluates; with text demos the missing train
    file is named."""
    model, processor = model_and_processor
    data = make_vqa(tmp_path / "data")
    for name in ("train_questions.json", "train_annotations.json"):
        (data / name).unlink()
    results = evaluate(model, processor, "vqa", str(data), zero_shot="none", **QUICK)
    assert results["num_samples"] == 5 and results["runs"][0]["skipped"] == 0
    with pytest.raises(FileNotFoundError, match="train_questions.json"):
        evaluate(model, processor, "vqa", str(data), zero_shot="text", **QUICK)


def test_an_episode_listing_a_demo_the_train_split_lacks_is_refused_before_any_query(model_and_processor, tmp_path,
                                                                                        monkeypatch):
    model, processor = model_and_processor
    data = make_vqa(tmp_path / "data", episodes=True)
    path = data / "test_questions.json"
    questions = json.loads(path.read_text())["questions"]
    questions[3]["demo_ids"][1] = 999
    write_json(path, {"questions": questions})
    ran = []
    monkeypatch.setattr("flamingo.eval.runner.predict", lambda *a, **k: ran.append(1))
    with pytest.raises(ValueError, match=r"sample '103' lists demo_ids \['999'\] that the train split lacks"):
        evaluate(model, processor, "vqa", str(data), **{**QUICK, "shots": [1, 2]})
    assert ran == []
    monkeypatch.undo()
    results = evaluate(model, processor, "vqa", str(data), **{**QUICK, "shots": [1]})  # 1 shot does not show it
    assert results["runs"][0]["skipped"] == 0


def _imagenet(root, val_classes=("n01440764", "n01443537")):
    """ImageNet-style folders: 3 classes in train/, `val_classes` of them in val/ (a quick subset)."""
    from flamingo.tiny import random_image

    for split, classes in (("train", ("n01440764", "n01443537", "n01484850")), ("val", val_classes)):
        for j, wnid in enumerate(classes):
            (root / split / wnid).mkdir(parents=True)
            random_image(j).save(root / split / wnid / f"{split}{j}.png")
    return root


def test_imagenet_folders_name_a_val_subset_as_the_whole_dataset(tmp_path):
    """classes.json names the union of train/ and val/'s class folders: a val/ with 2 of the 3 classes gets names,
    not WordNet ids, and its queries rank all 3 classes; a list or map that does not fit is refused."""
    root = _imagenet(tmp_path / "imagenet")
    names = ["tench", "goldfish", "great white shark"]
    write_json(root / "classes.json", names)
    task = get_task("classification")
    assert [s.label for s in task.load(str(root), "train")] == names
    test = task.load(str(root), "test")
    assert [s.label for s in test] == ["tench", "goldfish"] and task.candidates_for(test[0]) == names
    write_json(root / "classes.json", {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "shark"})
    assert get_task("classification").load(str(root), "test")[1].label == "goldfish"
    write_json(root / "classes.json", names[:2])
    with pytest.raises(ValueError, match="lists 2 names, but train/ and val/ hold 3 class folders"):
        get_task("classification").load(str(root), "test")
    write_json(root / "classes.json", {"n01440764": "tench", "n01443537": "goldfish"})
    with pytest.raises(ValueError, match=r"names no class for the folders \['n01484850'\]"):
        get_task("classification").load(str(root), "test")
    (root / "classes.json").unlink()
    assert [s.label for s in get_task("classification").load(str(root), "test")] == ["n01440764", "n01443537"]


# ------------------------------------------------------------------------------------- VQA annotations, decoding
def _rewrite_vqa_annotations(data, change):
    """Apply `change` to every annotation of both splits of a `make_vqa` directory."""
    for split in ("train", "test"):
        path = data / f"{split}_annotations.json"
        annotations = json.loads(path.read_text())["annotations"]
        for annotation in annotations:
            change(annotation)
        write_json(path, {"annotations": annotations})


def test_a_vqa_annotation_with_only_its_multiple_choice_answer_scores_a_perfect_prediction_100(tmp_path):
    """Without `answers` the one reference is `multiple_choice_answer` (the loader's fallback): scored as an exact
    match after normalisation, not by the 10-answer leave-one-out (which scores anything 0 against one answer)."""
    data = make_vqa(tmp_path / "data")
    _rewrite_vqa_annotations(data, lambda a: a.pop("answers"))
    task = get_task("vqa")
    samples = task.load(str(data), "test")
    assert [len(s.references) for s in samples] == [1] * len(samples)
    perfect = [{"prediction": s.answer.upper() + "."} for s in samples]
    assert task.compute_metrics(samples, perfect)["vqa_accuracy"] == 100.0
    assert task.compute_metrics(samples, [{"prediction": "zebra"}] * len(samples))["vqa_accuracy"] == 0.0


def test_vqa_answers_given_as_json_numbers_are_read_as_strings(model_and_processor, tmp_path):
    """"how many" answers written as JSON numbers: a prediction "2" scores 100 and the demos show "2" (not a
    TypeError in the prompt, nor an AttributeError in the metric after the run's inference)."""
    data = make_vqa(tmp_path / "data")
    _rewrite_vqa_annotations(data, lambda a: a.update(answers=[{"answer": 2}] * 10, multiple_choice_answer=2))
    task = get_task("vqa")
    samples = task.load(str(data), "test")
    assert samples[0].answer == "2" and samples[0].references == ["2"] * 10
    assert task.compute_metrics(samples, [{"prediction": "2"}] * len(samples))["vqa_accuracy"] == 100.0
    model, processor = model_and_processor
    results = evaluate(model, processor, "vqa", str(data), **{**QUICK, "shots": [0, 1]}, out_dir=str(tmp_path / "out"))
    assert [run["shots"] for run in results["runs"]] == [0, 1]
    _rewrite_vqa_annotations(data, lambda a: a.update(answers=[{"answer": 0}] * 10, multiple_choice_answer=0))
    assert task.load(str(data), "test")[0].answer == "0"  # 0 is an answer, not a missing one


def test_ok_vqa_annotations_warn_once_that_predictions_are_not_stemmed(tmp_path):
    """OK-VQA's answers are stemmed ("ride", `raw_answer` "riding"); its stemmer is not shipped, so the task says the
    accuracy is below the official metric: once per task, and not for VQAv2-style answers."""
    data = make_vqa(tmp_path / "data")
    _rewrite_vqa_annotations(data, lambda a: a.update(answers=[{"answer": "ride", "raw_answer": "riding"}] * 10,
                                                      multiple_choice_answer="ride"))
    task = get_task("vqa")
    with pytest.warns(UserWarning, match="raw_answer.*not stemmed.*below the official OK-VQA metric"):
        task.load(str(data), "test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.load(str(data), "train")  # the same task: warned already
        get_task("vqa").load(str(make_vqa(tmp_path / "vqav2")), "test")  # no `raw_answer`: no warning


def test_every_generate_task_beam_searches_with_length_penalty_0():
    """OpenFlamingo's evaluate.py decodes VQA and captioning with length_penalty 0.0 (a beam ranked by its summed
    log-probability), not transformers' 1.0; the tasks that share their decoding do too."""
    generate = {name: cls for name, cls in TASKS.items() if cls.kind == "generate"}
    assert set(generate) == {"vqa", "captioning", "videoqa", "video_captioning", "multi_image", "multi_image_plain"}
    for cls in generate.values():
        assert cls().generation_settings() == {"max_new_tokens": cls.max_new_tokens, "num_beams": 3,
                                               "length_penalty": 0.0}
    assert get_task("vqa").generation_settings({"length_penalty": 1.0})["length_penalty"] == 1.0


@pytest.mark.parametrize("task", ["vqa", "captioning"])
def test_generate_gets_length_penalty_0_and_results_record_it(task, model_and_processor, tmp_path):
    model, processor = model_and_processor
    data = DATASET_MAKERS[task](tmp_path / "data")
    calls = []
    generate = model.generate
    model.generate = lambda *a, **k: calls.append(k) or generate(*a, **k)
    common = dict(shots=[0], trials=1, progress=False, cider_tokenizer="python")
    try:
        results = evaluate(model, processor, task, str(data), **common, generation={"max_new_tokens": 2})
        assert calls and all(k["length_penalty"] == 0.0 and k["num_beams"] == 3 for k in calls)
        assert results["settings"]["generation"] == {"max_new_tokens": 2, "num_beams": 3, "length_penalty": 0.0}
        calls.clear()  # greedy: not passed (transformers would warn that a beam-only flag is set)
        evaluate(model, processor, task, str(data), **common, generation={"max_new_tokens": 2, "num_beams": 1})
        assert calls and all("length_penalty" not in k for k in calls)
    finally:
        del model.generate


def test_eval_subcommand_overrides_the_length_penalty(saved_model, tmp_path):
    data = make_vqa(tmp_path / "data")
    parser = argparse.ArgumentParser()
    add_eval_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", saved_model, "--task", "vqa", "--data", str(data), "--shots", "0",
                              "--trials", "1", "--num-samples", "2", "--max-new-tokens", "2", "--length-penalty", "1",
                              "--out", str(tmp_path / "out"), "--no-progress"])
    assert args.func(args) == 0
    generation = json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["generation"]
    assert generation == {"max_new_tokens": 2, "num_beams": 3, "length_penalty": 1.0}


# ---------------------------------------------------------------------------------- OpenFlamingo's prompts, layouts
def _prompt_samples(fields):
    return [Sample(f"s{k}", [f"/img/{k}.png"], f, answer=a) for k, (f, a) in enumerate(fields)]


def test_vqa_and_captioning_prompts_are_openflamingos_verbatim():
    """OpenFlamingo's evaluate.py writes `get_vqa_prompt(...) + "\\n"` / `get_caption_prompt(...) + "\\n"` per demo
    (image tags removed at 0 shots) and `get_hateful_memes_prompt(...)` with nothing after: the strings below are
    what its prompt functions and that assembly give for these demos."""
    demo1, demo2, query = _prompt_samples([({"question": "what colour?"}, "red"), ({"question": "how many?"}, "two"),
                                           ({"question": "what shape?"}, "")])
    vqa = get_task("vqa")
    assert build_prompt(vqa, query, [demo1, demo2])[0] == (
        "<image>Question:what colour? Short answer:red<|endofchunk|>\n"
        "<image>Question:how many? Short answer:two<|endofchunk|>\n"
        "<image>Question:what shape? Short answer:")
    assert build_prompt(vqa, query, [demo1, demo2], with_media=False)[0] == (  # 0 shots: two text-only demos
        "Question:what colour? Short answer:red<|endofchunk|>\n"
        "Question:how many? Short answer:two<|endofchunk|>\n"
        "<image>Question:what shape? Short answer:")
    demo1, demo2, query = _prompt_samples([({}, "A dog on a bed."), ({}, "Two cats."), ({}, "")])
    for name in ("captioning", "video_captioning"):  # video captioning: the same task, the same prompt
        assert build_prompt(get_task(name), query, [demo1, demo2])[0] == (
            "<image>Output:A dog on a bed.<|endofchunk|>\n<image>Output:Two cats.<|endofchunk|>\n<image>Output:")
        assert build_prompt(get_task(name), query, [demo1, demo2], with_media=False)[0] == (
            "Output:A dog on a bed.<|endofchunk|>\nOutput:Two cats.<|endofchunk|>\n<image>Output:")
    demo1, demo2, query = _prompt_samples([({"text": "one"}, "yes"), ({"text": "two"}, "no"), ({"text": "three"}, "")])
    hateful = get_task("hateful_memes")
    assert build_prompt(hateful, query, [demo1, demo2])[0] == (
        "<image>is an image with: 'one' written on it. Is it hateful? Answer:yes<|endofchunk|>"
        "<image>is an image with: 'two' written on it. Is it hateful? Answer:no<|endofchunk|>"
        "<image>is an image with: 'three' written on it. Is it hateful? Answer:")
    assert build_prompt(hateful, query, [demo1, demo2], with_media=False)[0] == (
        "is an image with: 'one' written on it. Is it hateful? Answer:yes<|endofchunk|>"
        "is an image with: 'two' written on it. Is it hateful? Answer:no<|endofchunk|>"
        "<image>is an image with: 'three' written on it. Is it hateful? Answer:")
    assert {n for n, cls in TASKS.items() if cls.demo_separator} == {"vqa", "captioning", "video_captioning"}
    # overridden by name; the query alone has no separator
    assert build_prompt(get_task("captioning", demo_separator=""), query, [demo1])[0] == (
        "<image>Output:yes<|endofchunk|><image>Output:")
    assert build_prompt(get_task("hateful_memes", demo_separator=" "), query, [])[0] == hateful.query_prompt(query)
    with pytest.raises(ValueError, match="demo_separator"):
        get_task("vqa", demo_separator=1)


def test_the_demo_separator_is_recorded_and_overridden_from_evaluate_and_the_cli(saved_model, model_and_processor,
                                                                                  tmp_path, monkeypatch):
    import flamingo.eval.runner as runner

    model, processor = model_and_processor
    data = make_vqa(tmp_path / "data")
    prompts = []
    spy = runner.build_prompt
    monkeypatch.setattr(runner, "build_prompt", lambda *a, **k: prompts.append(spy(*a, **k)[0]) or spy(*a, **k))
    one = dict(shots=[1], trials=1, num_samples=2, progress=False, generation={"max_new_tokens": 2, "num_beams": 1})
    results = evaluate(model, processor, "vqa", str(data), **one, demo_separator="||")
    assert results["settings"]["demo_separator"] == "||"
    assert prompts and all("<|endofchunk|>||<image>Question:" in p for p in prompts)
    with pytest.raises(ValueError, match="demo_separator"):  # a Task instance has its own
        evaluate(model, processor, get_task("vqa"), str(data), **one, demo_separator="")
    with pytest.raises(ValueError, match="chat"):
        evaluate(model, processor, "vqa", str(data), **one, demo_separator="", chat=True)
    parser = argparse.ArgumentParser()
    add_eval_subcommand(parser.add_subparsers(dest="command"))
    base = ["eval", "--model", saved_model, "--task", "vqa", "--data", str(data), "--shots", "1", "--trials", "1",
            "--num-samples", "2", "--max-new-tokens", "2", "--num-beams", "1", "--no-progress"]
    for n, (given, separator) in enumerate(((None, "\n"), ("", ""), (r"\n\n", "\n\n"), ("\n", "\n"),
                                            ("é\\t", "é\t"))):
        prompts.clear()
        out = tmp_path / f"out{n}"
        args = parser.parse_args(base + ["--out", str(out)] + ([] if given is None else [f"--demo-separator={given}"]))
        assert args.demo_separator == (None if given is None else separator)
        assert args.func(args) == 0
        assert json.loads((out / "results.json").read_text())["settings"]["demo_separator"] == separator
        assert all(f"<|endofchunk|>{separator}<image>Question:" in p for p in prompts), (given, prompts)
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--demo-separator", "\\x"])  # a broken escape: argparse's error


def _official_vqa(root, image_ids, files):
    """A VQA split per `image_ids` (its test split: the same) with empty image `files` under images/."""
    (root / "images").mkdir(parents=True)
    for name in files:
        (root / "images" / name).touch()
    for split in ("train", "test"):
        write_json(root / f"{split}_questions.json", {"questions": [
            {"question_id": k, "image_id": i, "question": "what is it?"} for k, i in enumerate(image_ids)]})
        write_json(root / f"{split}_annotations.json", {"annotations": [
            {"question_id": k, "answers": [{"answer": "cat"}] * 10} for k in range(len(image_ids))]})
    return root


def test_vizwiz_image_ids_that_are_file_names_are_found_and_evaluate(model_and_processor, tmp_path):
    """OpenFlamingo's VizWiz files name each image by its file name (`"image_id": "VizWiz_val_00000000.jpg"`)."""
    model, processor = model_and_processor
    root = tmp_path / "vizwiz"
    names = [f"VizWiz_val_{k:08d}.jpg" for k in range(3)]
    _official_vqa(root, names, [])
    for k, name in enumerate(names):
        random_image(k).save(root / "images" / name)
    samples = get_task("vqa").load(str(root), "test")
    assert [s.media for s in samples] == [[str(root / "images" / n)] for n in names]
    results = evaluate(model, processor, "vqa", str(root), shots=[0, 1], trials=1, progress=False,
                       generation={"max_new_tokens": 2, "num_beams": 1})
    assert [r["skipped"] for r in results["runs"]] == [0, 0]


def test_vqa_lists_its_image_directory_once_per_split_not_once_per_question(tmp_path, monkeypatch):
    """VQAv2's images keep COCO's names (`COCO_val2014_000000000042.jpg`): a directory listing per question took
    ~33 ms each on val2014's 40,504 files, hours for VQAv2."""
    from pathlib import Path

    ids = [i % 50 for i in range(200)] + [999]  # 200 questions over 50 images; 999 has none
    files = [f"COCO_val2014_{i:012d}.jpg" for i in range(50)] + ["tx7.png", "abc.jpg"]
    root = _official_vqa(tmp_path / "vqav2", ids + ["tx7", "abc"], files)
    calls = {"list": 0, "stat": 0}

    def counting(kind, original):
        def wrapped(*a, **k):
            calls[kind] += 1
            return original(*a, **k)

        return wrapped

    monkeypatch.setattr(Path, "glob", counting("list", Path.glob))
    monkeypatch.setattr(Path, "iterdir", counting("list", Path.iterdir))
    monkeypatch.setattr(os, "scandir", counting("list", os.scandir))
    monkeypatch.setattr(os, "listdir", counting("list", os.listdir))
    monkeypatch.setattr(Path, "is_file", counting("stat", Path.is_file))
    samples = get_task("vqa").load(str(root), "test")
    assert calls["list"] == 1 and calls["stat"] < 10, calls
    images = root / "images"
    assert [s.media[0] for s in samples[:51]] == [str(images / f"COCO_val2014_{i % 50:012d}.jpg") for i in range(51)]
    assert [s.media[0] for s in samples[200:]] == [str(images / n) for n in ("999.jpg", "tx7.png", "abc.jpg")]


def test_hateful_memes_reads_phase_1s_dev_jsonl_when_test_jsonl_is_unlabeled(tmp_path):
    """The original (phase 1) download: train.jsonl, dev.jsonl and a test.jsonl without labels."""
    root = tmp_path / "hm"
    task = get_task("hateful_memes")
    write_jsonl(root / "train.jsonl", [{"id": i, "img": f"img/{i}.png", "text": "t", "label": i % 2} for i in range(2)])
    write_jsonl(root / "dev.jsonl", [{"id": i, "img": f"img/{i}.png", "text": "d", "label": i % 2}
                                     for i in range(10, 14)])
    assert [s.id for s in task.load(str(root), "test")] == ["10", "11", "12", "13"]  # no test.jsonl: dev.jsonl
    write_jsonl(root / "test.jsonl", [{"id": i, "img": f"img/{i}.png", "text": "u"} for i in range(20, 23)])
    with pytest.warns(UserWarning, match="test.jsonl' has no labels .*: evaluating dev.jsonl"):
        assert [s.id for s in task.load(str(root), "test")] == ["10", "11", "12", "13"]
    write_jsonl(root / "dev_seen.jsonl", [{"id": 30, "img": "img/30.png", "text": "s", "label": 1}])
    with pytest.warns(UserWarning, match="evaluating dev_seen.jsonl"):  # the final release's, when both are there
        assert [s.id for s in task.load(str(root), "test")] == ["30"]
    (root / "dev_seen.jsonl").unlink()
    (root / "dev.jsonl").unlink()
    with pytest.raises(ValueError, match="has no labels .* no dev_seen.jsonl or dev.jsonl beside it"):
        task.load(str(root), "test")
    write_jsonl(root / "test.jsonl", [{"id": 40, "img": "img/40.png", "text": "l", "label": 0}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s.label for s in task.load(str(root), "test")] == [0]  # a labeled test.jsonl is the test split
    (root / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        task.load(str(root), "test")


# ------------------------------------------------------------------------------- ranked candidates' token ids
RANKED = [name for name, cls in TASKS.items() if cls.kind == "rank"]
CANDIDATES = ["yes", "no", "cat", "red bird", "a dog", "Yes."]


def _ranked_samples(task, n):
    """A query and demos of a ranked task: every field its template names filled, the candidates above."""
    names = {f for _, f, _, _ in string.Formatter().parse(task.template) if f and f != "answer"}
    return [Sample(f"s{k}", [f"/img/{k}.png"], {f: f"is the thing {k} red" for f in names}, answer="yes",
                   candidates=CANDIDATES) for k in range(n)]


def test_ranked_candidates_are_the_tokens_of_the_prompt_with_its_answer_written_out(tmp_path):
    """A LLaMA-1-era tokenizer (its tokenizer.json prepends a word-start `▁` to every text run: IDEFICS, Otter-LLaMA,
    OpenFlamingo v1, Med-Flamingo) gives a continuation tokenized alone a `▁` that "Answer:yes" in a demo never shows.
    A candidate's ids are the tail of the ids of prompt + continuation (lm-eval-harness's split): prompt ids +
    candidate ids == the ids of the prompt with the answer written out; where the joint ids do not start with the
    prompt's (this tiny vocabulary merges across the boundary), the continuation alone. Chat prompts likewise; after
    Otter's `<answer>` (a special token) a continuation starts its own run, so it keeps its ids alone."""
    from test_tokenizer_legacy import _llama_dir

    processor, _ = flamingo_processor(str(_llama_dir(tmp_path / "lm", "absent")), tiny_image_processor(),
                                      max_frames=1, max_positions=None)
    processor.tokenizer.add_tokens([OTTER_ANSWER, END_OF_UTTERANCE], special_tokens=True)  # as Otter's, IDEFICS's
    joint = fallback = 0
    for name in RANKED:
        for chat in (None, OtterChat(), IdeficsChat()):
            task = get_task(name)
            task.use_chat(chat)
            query, *demos = _ranked_samples(task, 3)
            for shown in ([], demos):
                prompt = build_prompt(task, query, shown)[0]
                head = processor.prompt_ids(prompt)
                for candidate, ids in zip(CANDIDATES, continuation_ids_of(processor, task, CANDIDATES, prompt)):
                    whole = processor.prompt_ids(prompt + task.continuation(candidate))
                    alone = processor.token_ids(task.continuation(candidate), special_tokens=False)
                    if whole[:len(head)] != head:
                        assert ids == alone
                        fallback += 1
                        continue
                    assert head + ids == whole, (name, chat, candidate)
                    assert (ids == alone) == isinstance(chat, OtterChat), (name, chat, candidate)
                    joint += 1
    assert joint > 10 * fallback > 0


def test_byte_level_bpe_candidates_keep_the_ids_they_have_alone(model_and_processor):
    """GPT-2 / NeoX / MPT-style byte-level BPE (the tiny models' tokenizer and the demo's) splits a word with its
    leading space whatever precedes it: every ranked task's candidates are scored as the very ids of their
    continuation tokenized alone, in template and chat prompts, with and without demos."""
    _, processor = model_and_processor
    for name in RANKED:
        for chat in (None, ChatFormat(), OtterChat(), IdeficsChat()):
            task = get_task(name)
            task.use_chat(chat)
            query, *demos = _ranked_samples(task, 3)
            for shown in ([], demos):
                ids = continuation_ids_of(processor, task, CANDIDATES, build_prompt(task, query, shown)[0])
                assert ids == [processor.token_ids(task.continuation(c), special_tokens=False) for c in CANDIDATES]
