"""`demo_answer`: a VQA demo shows its annotation's consensus `multiple_choice_answer` ("consensus", the default) or
its first human answer ("first"), as OpenFlamingo 2.0.1's evaluate.py writes its VQA demos
(`get_vqa_prompt(question=x["question"], answer=x["answers"][0])`, `answers` read by eval_datasets.py's VQADataset as
`[a["answer"] for a in annotation["answers"]]`). Only the vqa task takes the choice."""

import argparse
import json

import pytest

from flamingo.eval import evaluate
from flamingo.eval.cli import add_eval_subcommand
from flamingo.eval.predict import build_prompt
from flamingo.eval.tasks import get_task
from flamingo.eval.vqa import VQATask

from helpers import make_classification, make_vqa, write_json


def _vqa_whose_consensus_is_not_the_first_answer(root):
    """`make_vqa`, each annotation's consensus (`multiple_choice_answer`) an answer other than its first human one."""
    data = make_vqa(root)
    for split in ("train", "test"):
        path = data / f"{split}_annotations.json"
        annotations = json.loads(path.read_text())["annotations"]
        for a in annotations:
            i = a["question_id"]
            a["answers"] = [{"answer": f"first{i}"}] + [{"answer": f"most{i}"}] * 9
            a["multiple_choice_answer"] = f"most{i}"
        write_json(path, {"annotations": annotations})
    return data


def _demo_text(task, data):
    """The prompt of the first test question after the first two train questions as demos."""
    pool, query = task.load(str(data), "train"), task.load(str(data), "test")[0]
    return build_prompt(task, query, pool[:2])[0]


def test_demos_show_the_consensus_or_the_first_human_answer(tmp_path):
    data = _vqa_whose_consensus_is_not_the_first_answer(tmp_path / "data")
    consensus = (
        "<image>Question:what is 0? Short answer:most0<|endofchunk|>\n"
        "<image>Question:what is 1? Short answer:most1<|endofchunk|>\n"
        "<image>Question:what is 100? Short answer:"
    )
    assert _demo_text(get_task("vqa"), data) == consensus  # the default
    assert _demo_text(get_task("vqa", demo_answer="consensus"), data) == consensus
    # OpenFlamingo's prompt: each demo's answers[0], "\n" after it
    first = consensus.replace("most0", "first0").replace("most1", "first1")
    assert _demo_text(get_task("vqa", demo_answer="first"), data) == first
    # the references scored against are every human answer either way
    for choice in ("consensus", "first"):
        sample = get_task("vqa", demo_answer=choice).load(str(data), "test")[0]
        assert sample.references == ["first100"] + ["most100"] * 9


def test_first_falls_back_to_the_consensus_without_human_answers(tmp_path):
    data = make_vqa(tmp_path / "data")
    path = data / "train_annotations.json"
    annotations = json.loads(path.read_text())["annotations"]
    for a in annotations:
        del a["answers"]
        a["multiple_choice_answer"] = "only"
    write_json(path, {"annotations": annotations})
    assert {s.answer for s in get_task("vqa", demo_answer="first").load(str(data), "train")} == {"only"}


@pytest.mark.usefixtures("one_thread")
def test_the_cli_threads_the_choice_to_the_prompts_and_records_it(tmp_path, monkeypatch):
    """`flamingo eval --demo-answer first` reaches the prompts the model gets; results.json records the choice
    (`settings.demo_answer`: "consensus" by default, null for a task without the choice)."""
    import flamingo.eval.runner as runner
    from flamingo.tiny import tiny_flamingo

    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    data = _vqa_whose_consensus_is_not_the_first_answer(tmp_path / "data")
    prompts = []

    def generate(model, processor, loader, task, batch, **generation):  # the prompts the model would get
        prompts.extend(text for text, _ in batch)
        return [{"prediction": "", "raw": ""} for _ in batch]

    monkeypatch.setattr(runner, "generate_batch", generate)
    parser = argparse.ArgumentParser()
    add_eval_subcommand(parser.add_subparsers(dest="command"))
    common = [
        "eval",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(data),
        "--shots",
        "2",
        "--trials",
        "1",
        "--no-progress",
    ]
    for choice in ("first", None):
        prompts.clear()
        out = tmp_path / f"out_{choice}"
        args = parser.parse_args(
            [*common, "--task", "vqa", "--out", str(out)] + (["--demo-answer", choice] if choice else [])
        )
        assert args.func(args) == 0
        shown = "first" if choice == "first" else "most"
        hidden = "most" if choice == "first" else "first"
        assert len(prompts) == 5 and all(f"Short answer:{shown}" in p and hidden not in p for p in prompts)
        assert json.loads((out / "results.json").read_text())["settings"]["demo_answer"] == (choice or "consensus")
    data = make_classification(tmp_path / "classification")
    args = parser.parse_args([*common, "--task", "classification", "--data", str(data), "--out", str(tmp_path / "c")])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "c" / "results.json").read_text())["settings"]["demo_answer"] is None


def test_tasks_without_the_choice_refuse_it(tmp_path):
    with pytest.raises(ValueError, match="demo_answer applies to the vqa task .*; captioning shows its demos' own"):
        get_task("captioning", demo_answer="first")
    with pytest.raises(ValueError, match="demo_answer applies to the vqa task"):
        get_task("videoqa", demo_answer="consensus")
    with pytest.raises(ValueError, match=r"demo_answer must be one of \('consensus', 'first'\), got 'majority'"):
        get_task("vqa", demo_answer="majority")
    with pytest.raises(ValueError, match="demo_answer"):  # a Task instance has its own
        evaluate(None, None, VQATask(), str(tmp_path), demo_answer="first")
    parser = argparse.ArgumentParser()
    add_eval_subcommand(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--task", "vqa", "--data", "d", "--demo-answer", "majority"])
    args = parser.parse_args(
        [
            "eval",
            "--model",
            str(tmp_path / "absent"),
            "--task",
            "hateful_memes",
            "--data",
            "d",
            "--demo-answer",
            "first",
        ]
    )
    with pytest.raises(ValueError, match="--demo-answer applies to the vqa task .*; hateful_memes shows"):
        args.func(args)  # before the model loads: --model names nothing
