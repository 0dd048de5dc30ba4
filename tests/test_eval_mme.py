"""MME in the eval harness: the scores as MME defines them on a hand-written set, its release layouts, each query's
demos (other images of its subtask, never its own), and an evaluation end to end."""

from __future__ import annotations

import json

import pytest

from flamingo.eval.mme import MMETask, mme_scores
from flamingo.eval.runner import evaluate
from flamingo.tiny import random_image


def test_scores_are_accuracy_plus_accuracy_plus_per_subtask_and_summed_per_category():
    results = [("existence", "a", True), ("existence", "a", True),  # both right
               ("existence", "b", True), ("existence", "b", False),  # one right
               ("count", "c", False), ("count", "c", False),
               ("code_reasoning", "d", True), ("code_reasoning", "d", True)]
    m = mme_scores(results)
    assert (m["accuracy/existence"], m["accuracy_plus/existence"], m["score/existence"]) == (75.0, 50.0, 125.0)
    assert (m["accuracy/count"], m["accuracy_plus/count"], m["score/count"]) == (0.0, 0.0, 0.0)
    assert m["score/code_reasoning"] == 200.0
    assert (m["perception"], m["cognition"], m["total"]) == (125.0, 200.0, 325.0)
    assert (m["accuracy"], m["accuracy_plus"]) == (62.5, 50.0)
    unnamed = mme_scores(results + [("my_subtask", "e", True), ("my_subtask", "e", True)])
    assert unnamed["score/my_subtask"] == 200.0 and unnamed["total"] == 325.0  # in neither category


def _write_mme(root, images_per_subtask: int = 3):
    """Two subtasks, one per release layout: files side by side (existence), images/ + questions_answers_YN/
    (artwork). Question pairs: first answered Yes, second No."""
    side = root / "existence"
    side.mkdir(parents=True)
    for i in range(images_per_subtask):
        random_image(i).save(side / f"{i:03d}.png")
        (side / f"{i:03d}.txt").write_text(f"Is there a dog? Please answer yes or no.\tYes\n"
                                           f"Is there a cat {i}? Please answer yes or no.\tNo\n")
    art = root / "artwork"
    (art / "images").mkdir(parents=True)
    (art / "questions_answers_YN").mkdir()
    for i in range(images_per_subtask):
        random_image(10 + i).save(art / "images" / f"art{i}.jpg")
        (art / "questions_answers_YN" / f"art{i}.txt").write_text(
            f"Is this artwork by Monet?\tYes\nIs this artwork by Dali {i}?\tNo\n")


def test_both_release_layouts_load_and_demos_come_from_other_images_of_the_subtask(tmp_path):
    _write_mme(tmp_path)
    task = MMETask()
    samples = task.load(str(tmp_path), "test")
    assert len(samples) == 12 and {s.kind for s in samples} == {"existence", "artwork"}
    assert [s.answer for s in samples[:2]] == ["yes", "no"]
    assert samples[0].fields["question"] == "Is this artwork by Monet?"
    by_id = {s.id: s for s in task.load(str(tmp_path), "train")}
    assert set(by_id) == {s.id for s in samples}
    for s in samples:
        demos = [by_id[i] for i in s.demo_ids]
        assert len(demos) == 2 and all(d.kind == s.kind and d.media[0] != s.media[0] for d in demos)
        assert len({d.media[0] for d in demos}) == 2
    assert task.query_prompt(samples[0]) == "<image>Question:Is this artwork by Monet? Answer:"
    assert task.continuation("yes") == " yes<|endofchunk|>"


def test_malformed_lines_and_missing_images_are_clear_errors(tmp_path):
    _write_mme(tmp_path, images_per_subtask=1)
    (tmp_path / "existence" / "000.txt").write_text("Is there a dog?\tMaybe\n")
    with pytest.raises(ValueError, match=r"000.txt' line 1: expected 'question<TAB>Yes\|No'"):
        MMETask().load(str(tmp_path), "test")
    (tmp_path / "existence" / "000.txt").write_text("Is there a dog?\tYes\n")
    (tmp_path / "existence" / "000.png").unlink()
    with pytest.raises(FileNotFoundError, match="no image named '000'"):
        MMETask().load(str(tmp_path), "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no MME questions"):
        MMETask().load(str(tmp_path / "empty"), "test")


def test_evaluation_ranks_yes_or_no_and_scores_its_predictions_as_mme_does(make_model, tmp_path, one_thread):
    _write_mme(tmp_path / "mme")
    model, processor = make_model("llama")
    results = evaluate(model, processor, "mme", str(tmp_path / "mme"), shots=[0, 2], trials=1, batch_size=4,
                       out_dir=str(tmp_path / "out"), progress=False)
    task = MMETask()
    samples = {s.id: s for s in task.load(str(tmp_path / "mme"), "test")}
    for run in results["runs"]:
        path = tmp_path / "out" / "predictions" / f"mme_{run['shots']}shot_trial0.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == 12 and all(r["prediction"] in ("yes", "no") for r in records)
        expected = mme_scores([(samples[str(r["id"])].kind, samples[str(r["id"])].media[0],
                                r["prediction"] == samples[str(r["id"])].label) for r in records])
        assert run["metrics"] == pytest.approx(expected)
        assert 0 <= run["metrics"]["total"] <= 400 and run["metrics"]["cognition"] == 0.0


def test_more_shots_than_a_subtask_allows_are_refused_before_the_first_query(make_model, tmp_path, monkeypatch):
    """A subtask of n images lists n - 1 demos a query (MME's smallest: 20 images, 19 shots): asking more is refused
    before any shot count runs, naming a sample and the most shots the data allows, not after the smaller ones ran."""
    _write_mme(tmp_path / "mme")  # 3 images a subtask: 2 demos each
    model, processor = make_model("llama")
    ran = []
    monkeypatch.setattr("flamingo.eval.runner.predict", lambda *a, **k: ran.append(1))
    with pytest.raises(ValueError, match=r"4 shots asked, but sample '.+' lists 2 demo_ids \(12 of the 12 episodes "
                                         r"list too few\): the data allows at most 2 shots"):
        evaluate(model, processor, "mme", str(tmp_path / "mme"), shots=[0, 2, 4], trials=1,
                 out_dir=str(tmp_path / "out"), progress=False)
    assert ran == [] and not (tmp_path / "out").exists()
