"""`caption_demos`: captioning's demo pool is every Karpathy training image ("train+restval", the default) or the
`train` split alone ("train"), as OpenFlamingo 2.0.1's eval_datasets.py reads it (`CaptionDataset`: `if self.is_train
and full_annotations[i]["split"] != "train": continue`). Only the captioning task takes the choice."""

import argparse
import json

import pytest

from flamingo.eval import evaluate
from flamingo.eval.captioning import CaptioningTask
from flamingo.eval.cli import add_eval_subcommand
from flamingo.eval.video_captioning import VideoCaptioningTask

from helpers import make_captioning, make_classification


def _ids(task, data, split):
    return [s.id for s in task.load(str(data), split)]


def test_the_demo_pool_is_train_and_restval_or_train_alone(tmp_path):
    data = make_captioning(tmp_path / "data")  # splits by cocoid: train 0, 2; restval 1; val 3; test 4, 5, 6
    assert _ids(CaptioningTask(), data, "train") == ["0", "1", "2"]  # the default
    assert _ids(CaptioningTask(caption_demos="train+restval"), data, "train") == ["0", "1", "2"]
    assert _ids(CaptioningTask(caption_demos="train"), data, "train") == ["0", "2"]  # OpenFlamingo's pool
    for choice in ("train+restval", "train"):  # the evaluated images are the test split's either way
        assert _ids(CaptioningTask(caption_demos=choice), data, "test") == ["4", "5", "6"]


def _parser():
    parser = argparse.ArgumentParser()
    add_eval_subcommand(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.usefixtures("one_thread")
def test_the_cli_threads_the_choice_to_the_demos_and_records_it(tmp_path, monkeypatch):
    """`flamingo eval --caption-demos train` draws no restval demo; results.json records the choice
    (`settings.caption_demos`: "train+restval" by default, null for a task without the choice)."""
    import flamingo.eval.runner as runner
    from flamingo.tiny import tiny_flamingo

    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    data = make_captioning(tmp_path / "data")

    def generate(model, processor, loader, task, batch, **generation):  # the model's answer is not under test
        return [{"prediction": "a square", "raw": "a square"} for _ in batch]

    monkeypatch.setattr(runner, "generate_batch", generate)
    common = ["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--trials", "3", "--no-progress",
              "--cider-tokenizer", "python"]
    for choice, pool in (("train", {"0", "2"}), (None, {"0", "1", "2"})):
        out = tmp_path / f"out_{choice}"
        args = _parser().parse_args([*common, "--task", "captioning", "--shots", "0", "2", "--out", str(out)]
                                    + (["--caption-demos", choice] if choice else []))
        assert args.func(args) == 0
        shown = set()
        for file in (out / "predictions").iterdir():
            shown |= {i for line in file.read_text().splitlines() for i in json.loads(line)["demo_ids"]}
        assert shown == pool  # restval's image 1 is a demo only by default (3 trials x 3 queries draw it)
        settings = json.loads((out / "results.json").read_text())["settings"]
        assert settings["caption_demos"] == (choice or "train+restval")
    # 3 shots need 3 demos: the train split alone has 2
    args = _parser().parse_args([*common, "--task", "captioning", "--shots", "3", "--caption-demos", "train",
                                 "--out", str(tmp_path / "three")])
    with pytest.raises(ValueError, match="3 shots asked, but the query set holds 2 demos"):
        args.func(args)
    data = make_classification(tmp_path / "classification")
    args = _parser().parse_args([*common, "--task", "classification", "--data", str(data), "--shots", "0",
                                 "--trials", "1", "--out", str(tmp_path / "c")])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "c" / "results.json").read_text())["settings"]["caption_demos"] is None


def test_tasks_without_the_choice_refuse_it(tmp_path):
    with pytest.raises(ValueError, match="caption_demos applies to the captioning task .*; video_captioning draws"):
        VideoCaptioningTask(caption_demos="train")  # its train.json has no Karpathy splits
    assert VideoCaptioningTask().caption_demos == "train+restval"  # inherited, unused by its `load`
    with pytest.raises(ValueError, match=r"caption_demos must be one of \('train\+restval', 'train'\), got 'val'"):
        CaptioningTask(caption_demos="val")
    with pytest.raises(ValueError, match="caption_demos applies to the captioning task .*; vqa draws"):
        evaluate(None, None, "vqa", str(tmp_path), caption_demos="train")
    with pytest.raises(ValueError, match="caption_demos"):  # a Task instance has its own
        evaluate(None, None, CaptioningTask(), str(tmp_path), caption_demos="train")
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "--model", "m", "--task", "captioning", "--data", "d", "--caption-demos", "val"])
    args = _parser().parse_args(["eval", "--model", str(tmp_path / "absent"), "--task", "video_captioning",
                                 "--data", "d", "--caption-demos", "train"])
    with pytest.raises(ValueError, match="--caption-demos applies to the captioning task .*; video_captioning"):
        args.func(args)  # before the model loads: --model names nothing
