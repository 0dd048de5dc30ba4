"""How the few-shot tasks read their files: VisDial's images per split, MSRVTT-QA's clip names, and malformed files
refused with an error naming the file (the CLI prints a ValueError as one line; anything else is a traceback)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from flamingo.eval.runner import evaluate, load_split
from flamingo.eval.tasks import get_task
from flamingo.eval.visdial import _images_by_id

from helpers import (
    _image,
    _video,
    make_captioning,
    make_classification,
    make_hateful_memes,
    make_video_captioning,
    make_videoqa,
    make_videoqa_mc,
    make_visdial,
    make_vqa,
    write_jsonl,
)


def _add_colliding_train_dialog(root: Path, image: str) -> None:
    """A COCO train image and training dialog with the id of val dialog 11 (VisDial's val2018 ids are not COCO's)."""
    _image(root, image, 999)
    path = root / "visdial_1.0_train.json"
    train = json.loads(path.read_text())
    train["data"]["dialogs"].append({**train["data"]["dialogs"][0], "image_id": 11})
    path.write_text(json.dumps(train))


def _dialog_11_images(root: Path, split: str) -> set[str]:
    return {
        str(Path(s.media[0]).relative_to(root))
        for s in get_task("visdial").load(str(root), split)
        if s.id.startswith("11_")
    }


@pytest.mark.parametrize("folders", [None, ("train2014", "VisualDialog_val2018"), ("coco", "val2018")])
def test_visdial_takes_each_splits_image_of_an_id_both_splits_use(tmp_path, folders):
    root = make_visdial(tmp_path / "visdial", dense=False)
    _add_colliding_train_dialog(root, "images/COCO_train2014_000000000011.png")
    if folders is not None:  # the downloads' own folders, sorting either way
        for p in list((root / "images").iterdir()):
            folder = root / folders[p.name.startswith("VisualDialog")]
            folder.mkdir(exist_ok=True)
            p.rename(folder / p.name)
    assert {Path(p).name for p in _dialog_11_images(root, "train")} == {"COCO_train2014_000000000011.png"}
    assert {Path(p).name for p in _dialog_11_images(root, "test")} == {"VisualDialog_val2018_000000000011.png"}


def test_visdial_tells_bare_ids_apart_by_folder_and_refuses_an_id_nothing_names(tmp_path):
    root = make_visdial(tmp_path / "visdial", dense=False)
    for p in list((root / "images").iterdir()):  # bare ids (`11.png`), split by the downloads' folders
        folder = root / ("val2018" if p.name.startswith("VisualDialog") else "train2014")
        folder.mkdir(exist_ok=True)
        p.rename(folder / f"{int(p.stem.rsplit('_', 1)[1])}.png")
    _add_colliding_train_dialog(root, "train2014/11.png")
    assert _dialog_11_images(root, "train") == {"train2014/11.png"}
    assert _dialog_11_images(root, "test") == {"val2018/11.png"}
    (root / "other").mkdir()
    (root / "val2018" / "11.png").rename(root / "other" / "11.png")
    _images_by_id.cache_clear()  # the listing is cached per directory
    with pytest.raises(ValueError, match=r"image_id 11: 2 images .* none names the test split's \(val2018\)"):
        get_task("visdial").load(str(root), "test")


def test_videoqa_finds_msrvtt_qa_clips_named_video_id(make_model, tmp_path, one_thread):
    """MSRVTT-QA's records (an integer `video_id`) and MSR-VTT's clip names (`videos/video7010.mp4`)."""
    root = tmp_path / "msrvtt"
    for split, ids in (("train", (0, 1, 2)), ("test", (7010, 7011))):
        rows = [
            {"answer": "man", "category_id": 0, "id": n, "question": "who is talking?", "video_id": v}
            for n, v in enumerate(ids)
        ]
        for v in ids:
            _video(root, f"videos/video{v}.mp4", v)
        (root / f"{split}_qa.json").write_text(json.dumps(rows))
    _video(root, "videos/7011.avi", 1)  # `{video_id}` first, with any video extension
    samples = get_task("videoqa").load(str(root), "test")
    assert [s.media[0] for s in samples] == [str(root / "videos/video7010.mp4"), str(root / "videos/7011.avi")]
    model, processor = make_model("llama")
    results = evaluate(
        model,
        processor,
        "videoqa",
        str(root),
        shots=[0, 1],
        trials=1,
        progress=False,
        generation={"max_new_tokens": 2, "num_beams": 1},
    )
    assert [run["skipped"] for run in results["runs"]] == [0, 0]


def _rw_json(root: Path, name: str, change: Callable[[Any], Any]) -> str:
    """`name` under `root` rewritten by `change`; -> `name`."""
    (root / name).write_text(json.dumps(change(json.loads((root / name).read_text()))))
    return name


def _rw_jsonl(root: Path, name: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
    """Each record of `name` under `root` rewritten by `change`; -> `name`."""
    write_jsonl(root / name, [change(json.loads(line)) for line in (root / name).read_text().splitlines()])
    return name


def _dense(root: Path, **entry: Any) -> str:
    """The first dense annotation with `entry` (val dialog 10's, which annotates its round 2)."""
    return _rw_json(root, "visdial_1.0_val_dense_annotations.json", lambda a: [{**a[0], **entry}, *a[1:]])


def _round(root: Path, **turn: Any) -> str:
    """Val dialog 10's first round with `turn`."""

    def change(data: dict[str, Any]) -> dict[str, Any]:
        data["data"]["dialogs"][0]["dialog"][0].update(turn)
        return data

    return _rw_json(root, "visdial_1.0_val.json", change)


def _round_without(root: Path, key: str) -> str:
    """Val dialog 10's last round without `key` (VisDial's test file gives its last rounds no answer)."""

    def change(data: dict[str, Any]) -> dict[str, Any]:
        del data["data"]["dialogs"][0]["dialog"][-1][key]
        return data

    return _rw_json(root, "visdial_1.0_val.json", change)


def _multi_image(root: Path) -> Path:
    for split, ids in (("train", range(2)), ("test", range(10, 12))):
        write_jsonl(
            root / f"{split}.jsonl",
            [
                {
                    "id": i,
                    "images": [_image(root, f"images/{i}_{k}.png", i) for k in range(2)],
                    "question": "is <image0> like <image1>?",
                    "answer": "yes",
                }
                for i in ids
            ],
        )
    return root


def _mme(root: Path) -> Path:
    for i in range(2):
        _image(root / "existence", f"{i}.png", i)
        (root / "existence" / f"{i}.txt").write_text(f"q{i}?\tYes\nq{i} no?\tNo\n")
    return root


def _write(name: str, data: bytes) -> Callable[[Path], str]:
    def change(root: Path) -> str:
        (root / name).write_bytes(data)
        return name

    return change


# (task, dataset maker, change -> the file the error names, what the error says)
MALFORMED = {
    "visdial round_id past its dialog": (
        "visdial",
        make_visdial,
        lambda d: _dense(d, round_id=7),
        "round_id 7, but its dialog has rounds 1-3",
    ),
    "visdial round_id 0": ("visdial", make_visdial, lambda d: _dense(d, round_id=0), "round_id 0, but"),
    "visdial relevance of 2 options": (
        "visdial",
        make_visdial,
        lambda d: _dense(d, gt_relevance=[1.0, 0.0]),
        "2 gt_relevance scores, but its round 2 has 5 answer options",
    ),
    "visdial relevance not a list": (
        "visdial",
        make_visdial,
        lambda d: _dense(d, gt_relevance="10000"),
        "'gt_relevance' must be a list of numbers, got '10000'",
    ),
    "visdial gt_index past its options": (
        "visdial",
        make_visdial,
        lambda d: _round(d, gt_index=5),
        "image_id 10 round 1: gt_index 5 outside its 5 answer options (it counts from 0)",
    ),
    "visdial gt_index negative": ("visdial", make_visdial, lambda d: _round(d, gt_index=-1), "gt_index -1 outside"),
    "visdial gt_index a bool": ("visdial", make_visdial, lambda d: _round(d, gt_index=True), "gt_index True outside"),
    "visdial question id past the questions": (
        "visdial",
        make_visdial,
        lambda d: _round(d, question=6),
        "image_id 10 round 1: question id 6 is not an index into the file's 6 questions",
    ),
    "visdial answer id negative": (
        "visdial",
        make_visdial,
        lambda d: _round(d, answer=-1),
        "image_id 10 round 1: answer id -1 is not an index into the file's 12 answers",
    ),
    "visdial answer option past the answers": (
        "visdial",
        make_visdial,
        lambda d: _round(d, answer_options=[0, 1, 2, 3, 999]),
        "image_id 10 round 1: answer option id 999 is not an index into the file's 12 answers",
    ),
    "visdial answer options a string": (
        "visdial",
        make_visdial,
        lambda d: _round(d, answer_options="01234"),
        "image_id 10 round 1: 'answer_options' must be a list of answer ids, got '01234'",
    ),
    "visdial question id a float": (
        "visdial",
        make_visdial,
        lambda d: _round(d, question=1.0),
        "image_id 10 round 1: question id 1.0 is not an index",
    ),
    "vqa answers empty": (
        "vqa",
        make_vqa,
        lambda d: _rw_json(d, "test_annotations.json", lambda a: {"annotations": [
            {**r, "answers": [], "multiple_choice_answer": ""} if r["question_id"] == 102 else r
            for r in a["annotations"]]}),
        "question 102 has no answer",
    ),
    "vqa answer blank": (
        "vqa",
        make_vqa,
        lambda d: _rw_json(d, "test_annotations.json", lambda a: {"annotations": [
            {**r, "answers": [], "multiple_choice_answer": "  "} if r["question_id"] == 102 else r
            for r in a["annotations"]]}),
        "question 102 has no answer",
    ),
    "vqa answers missing": (
        "vqa",
        make_vqa,
        lambda d: _rw_json(d, "train_annotations.json", lambda a: {"annotations": [
            {"question_id": r["question_id"], "image_id": r["image_id"]} for r in a["annotations"]]}),
        "question 0 has no answer",
    ),
    "videoqa file an object": (
        "videoqa",
        make_videoqa,
        lambda d: _rw_json(d, "test_qa.json", lambda a: {"data": a}),
        "must be a JSON list of question records, got a dict",
    ),
    "videoqa answers as VQA's": (
        "videoqa",
        make_videoqa,
        lambda d: _rw_json(
            d, "test_qa.json", lambda a: [{**r, "answers": [{"answer": "a"}, {"answer": "b"}]} for r in a]
        ),
        "'answers' must be a list of answer",
    ),
    "videoqa answers a string": (
        "videoqa",
        make_videoqa,
        lambda d: _rw_json(d, "test_qa.json", lambda a: [{**r, "answers": "cat"} for r in a]),
        "'answers' must be a list",
    ),
    "videoqa answer null (an unlabeled split)": (
        "videoqa",
        make_videoqa,
        lambda d: _rw_json(d, "test_qa.json", lambda a: [{**r, "answer": None} for r in a]),
        "record 10 has no answer (neither 'answers' nor 'answer'): an unlabeled split cannot be scored",
    ),
    "videoqa answer blank": (
        "videoqa",
        make_videoqa,
        lambda d: _rw_json(d, "test_qa.json", lambda a: [{**r, "answer": " "} for r in a]),
        "record 10 has no answer",
    ),
    "videoqa answers empty and answer missing": (
        "videoqa",
        make_videoqa,
        lambda d: _rw_json(d, "test_qa.json", lambda a: [{"id": r["id"], "question": "q?", "video": "v.mp4",
                                                          "answers": []} for r in a]),
        "record 10 has no answer",
    ),
    "videoqa answers all blank": (
        "videoqa",
        make_videoqa,
        lambda d: _rw_json(d, "test_qa.json", lambda a: [{**r, "answers": ["", " "], "answer": None} for r in a]),
        "record 10 has no answer",
    ),
    "videoqa demo answer null": (
        "videoqa",
        make_videoqa,
        lambda d: _rw_json(d, "train_qa.json", lambda a: [{**r, "answer": None} for r in a]),
        "record 0 has no answer",
    ),
    "videoqa_mc options a string": (
        "videoqa_mc",
        make_videoqa_mc,
        lambda d: _rw_jsonl(d, "test.jsonl", lambda r: {**r, "options": "abc", "answer": "a"}),
        "'options' must be a list",
    ),
    "multi_image images a string": (
        "multi_image",
        _multi_image,
        lambda d: _rw_jsonl(d, "test.jsonl", lambda r: {**r, "images": r["images"][0]}),
        "'images' must be a list",
    ),
    "multi_image answer null": (
        "multi_image",
        _multi_image,
        lambda d: _rw_jsonl(d, "test.jsonl", lambda r: {**r, "answer": None}),
        "record 10 has no answer: an unlabeled split cannot be scored",
    ),
    "multi_image answer empty": (
        "multi_image",
        _multi_image,
        lambda d: _rw_jsonl(d, "test.jsonl", lambda r: {**r, "answer": ""}),
        "record 10 has no answer",
    ),
    "visdial round without an answer": (
        "visdial",
        make_visdial,
        lambda d: _round_without(d, "answer"),
        "image_id 10 round 3 has no 'answer': an unlabeled split cannot be scored",
    ),
    "visdial round without a question": (
        "visdial",
        make_visdial,
        lambda d: _round_without(d, "question"),
        "image_id 10 round 3: question id None is not an index",
    ),
    "captioning sentence without raw": (
        "captioning",
        make_captioning,
        lambda d: _rw_json(d, "captions.json", lambda c: {"images": [
            {**im, "sentences": [{"tokens": ["a"]}]} if im["cocoid"] == 4 else im for im in c["images"]]}),
        "image 4: 'raw' must be a string in every sentence, got [None]",
    ),
    "captioning caption null": (
        "captioning",
        make_captioning,
        lambda d: _rw_json(d, "captions.json", lambda c: {"images": [
            {**im, "sentences": [{"raw": None}, {"raw": "a cat"}]} if im["cocoid"] == 4 else im
            for im in c["images"]]}),
        "image 4: 'raw' must be a string in every sentence, got [None, 'a cat']",
    ),
    "captioning sentences a string": (
        "captioning",
        make_captioning,
        lambda d: _rw_json(d, "captions.json", lambda c: {"images": [
            {**im, "sentences": "a cat"} if im["cocoid"] == 0 else im for im in c["images"]]}),
        "image 0: 'sentences' must be a list of {\"raw\": caption}, got 'a cat'",
    ),
    "video_captioning captions a string": (
        "video_captioning",
        make_video_captioning,
        lambda d: _rw_json(d, "test.json", lambda a: [{**r, "captions": "a thing moves"} for r in a]),
        "'captions' must be a list of strings",
    ),
    "classification classes.json a string": (
        "classification",
        make_classification,
        _write("classes.json", b'"cat dog"'),
        "must be a list of class names or a {folder: name} map, got str",
    ),
    "classification classes.json a number": (
        "classification",
        make_classification,
        lambda d: _rw_json(d, "classes.json", lambda c: [c[0], 2.5, *c[2:]]),
        "'classes' must be a list of strings, got ['cat', 2.5",
    ),
    "classification classes.json a list in a list": (
        "classification",
        make_classification,
        lambda d: _rw_json(d, "classes.json", lambda c: [c[0], ["dog"], *c[2:]]),
        "'classes' must be a list of strings, got ['cat', ['dog']",
    ),
    "classification classes.json map to a number": (
        "classification",
        make_classification,
        lambda d: _rw_json(d, "classes.json", lambda c: {"n01": "cat", "n02": 7}),
        "a {folder: name} map's names must be strings, got 'n02': 7",
    ),
    "classification candidates a string": (
        "classification",
        make_classification,
        lambda d: _rw_jsonl(d, "test.jsonl", lambda r: {**r, "candidates": "dog"}),
        "'candidates' must be a list",
    ),
    "hateful_memes label a word": (
        "hateful_memes",
        make_hateful_memes,
        lambda d: _rw_jsonl(d, "dev_seen.jsonl", lambda r: {**r, "label": "hateful"}),
        "'label' must be 0 or 1, got 'hateful'",
    ),
    "hateful_memes label 2": (
        "hateful_memes",
        make_hateful_memes,
        lambda d: _rw_jsonl(d, "dev_seen.jsonl", lambda r: {**r, "label": 2}),
        "'label' must be 0 or 1, got 2",
    ),
    "mme latin-1": ("mme", _mme, _write("existence/0.txt", "caf\xe9?\tYes\n".encode("latin-1")), "is not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_task_file_is_refused_naming_the_file(tmp_path, case):
    task, make, change, message = MALFORMED[case]
    root = make(tmp_path / "data")
    name = change(root)
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        for split in ("train", "test"):
            load_split(get_task(task), str(root), split, str(root))
    assert str(root / name) in str(caught.value)


# shapes no loader checks: (task, dataset maker, change, what the error says)
UNCHECKED = {
    "a number where a list is read (TypeError)": (
        "visdial",
        make_visdial,
        lambda d: _rw_json(d, "visdial_1.0_val.json", lambda v: {**v, "data": {**v["data"], "dialogs": [
            {**v["data"]["dialogs"][0], "dialog": 3}]}}),
        "visdial: the test split of .* is not in the task's layout",
    ),
    "a record that is a string (AttributeError)": (
        "classification",
        make_classification,
        lambda d: (d / "test.jsonl").write_text('"s10"\n'),
        "classification: the test split of .* is not in the task's layout",
    ),
    "bytes that are not UTF-8 (UnicodeDecodeError)": (
        "videoqa_mc",
        make_videoqa_mc,
        lambda d: (d / "test.jsonl").write_bytes('{"id": "\xe9"}\n'.encode("latin-1")),
        r"evaluation file '.*test\.jsonl' is not UTF-8 text",  # the file named (it named the split)
    ),
}


@pytest.mark.parametrize("case", list(UNCHECKED))
def test_load_split_names_the_split_of_a_shape_no_loader_checks(tmp_path, case):
    """A ValueError naming the task, the split and the data (the CLI's one-line error), not a traceback."""
    task, make, change, expected = UNCHECKED[case]
    root = make(tmp_path / "data")
    change(root)
    with pytest.raises(ValueError, match=expected):
        load_split(get_task(task), str(root), "test", str(root))


def test_mme_drops_a_byte_order_mark(tmp_path):
    root = _mme(tmp_path / "mme")
    (root / "existence" / "0.txt").write_bytes("\ufeffq0?\tYes\r\nq0 no?\tNo\r\n".encode())
    questions = [s.fields["question"] for s in get_task("mme").load(str(root), "test")]
    assert questions == ["q0?", "q0 no?", "q1?", "q1 no?"]


def test_json_and_jsonl_task_files_drop_a_byte_order_mark(tmp_path):
    """A BOM (Notepad's, Excel's) before a JSONL or JSON task file is not data, as the training loaders read it."""
    root = make_hateful_memes(tmp_path / "hm")
    expected = [s.label for s in get_task("hateful_memes").load(str(root), "test")]
    path = root / "dev_seen.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [s.label for s in get_task("hateful_memes").load(str(root), "test")] == expected
    root = make_videoqa(tmp_path / "vq")
    expected = [s.fields for s in get_task("videoqa").load(str(root), "test")]
    path = root / "test_qa.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [s.fields for s in get_task("videoqa").load(str(root), "test")] == expected


def test_well_formed_files_load_as_before(tmp_path):
    """Labels 0/1 as numbers or strings, `answers` lists, and a single `answer` still load."""
    root = make_hateful_memes(tmp_path / "hm")
    _rw_jsonl(root, "dev_seen.jsonl", lambda r: {**r, "label": str(r["label"])})
    assert [s.label for s in get_task("hateful_memes").load(str(root), "test")] == [0, 1, 0, 1]
    root = make_videoqa(tmp_path / "vq")
    _rw_json(root, "test_qa.json", lambda rows: [{**rows[0], "answers": ["a", "b", 3, "b"]}, rows[1]])
    first, second = get_task("videoqa").load(str(root), "test")
    assert first.references == ["a", "b", "3", "b"] and second.references == [second.answer]


def test_a_videoqa_record_with_answers_and_a_null_answer_shows_the_most_given_with_text(tmp_path):
    """As VQA falls back from a null `multiple_choice_answer`: the demo answer is never "None" or blank."""
    root = make_videoqa(tmp_path / "vq")
    _rw_json(root, "train_qa.json", lambda rows: [{**rows[0], "answers": ["", "", "b", "a", "b"], "answer": None},
                                                  {**rows[1], "answers": ["a", "b"], "answer": " "}, rows[2]])
    first, second, _ = get_task("videoqa").load(str(root), "train")
    assert (first.answer, first.references) == ("b", ["", "", "b", "a", "b"])
    assert second.answer == "a"


def test_a_visdial_train_file_without_answer_options_still_gives_demos(tmp_path):
    """The demos are not ranked: a trimmed train file (no options, its gt_index kept) loads; the ranked split's
    gt_index is read as before."""
    root = make_visdial(tmp_path / "vd")

    def trim(data: dict[str, Any]) -> dict[str, Any]:
        for dialog in data["data"]["dialogs"]:
            for turn in dialog["dialog"]:
                del turn["answer_options"]
        return data

    _rw_json(root, "visdial_1.0_train.json", trim)
    demos = get_task("visdial").load(str(root), "train")
    assert len(demos) == 4 and all(d.candidates is None for d in demos)
    ranked = get_task("visdial").load(str(root), "test")
    assert [s.label["gt_index"] for s in ranked[:3]] == [0, 1, 2]


def test_a_visdial_dialog_without_rounds_gives_no_sample(tmp_path):
    """Neither a demo (no round `dialog index % rounds` to draw) nor a ranked round."""
    root = make_visdial(tmp_path / "vd", dense=False)
    for name in ("visdial_1.0_train.json", "visdial_1.0_val.json"):
        _rw_json(root, name, lambda v: {**v, "data": {**v["data"], "dialogs": [
            {**v["data"]["dialogs"][0], "dialog": []}, *v["data"]["dialogs"][1:]]}})
    assert len(get_task("visdial").load(str(root), "train")) == 3
    assert [s.id for s in get_task("visdial").load(str(root), "test")][:1] == ["11_1"]


HALF_EMOJI = "what \ud83d?"  # valid JSON ("\ud83d": a scraper cut an emoji), not valid Unicode


def test_half_an_emoji_in_a_task_file_is_tokenized_as_u_fffd(tmp_path):
    """As the training data reads it: tokenizers take valid Unicode only (they failed with a TypeError). The file's
    strings are kept as written: a media path may be a file name Python reads with surrogate escapes."""
    from flamingo.tiny import tiny_flamingo

    root = make_vqa(tmp_path / "vqa")
    _rw_json(
        root,
        "test_questions.json",
        lambda q: {"questions": [{**q["questions"][0], "question": HALF_EMOJI}, *q["questions"][1:]]},
    )
    assert get_task("vqa").load(str(root), "test")[0].fields["question"] == HALF_EMOJI
    _, processor = tiny_flamingo()
    assert processor.prompt_ids(HALF_EMOJI) == processor.prompt_ids("what \ufffd?")
    half, whole = (processor.token_ids(t, special_tokens=False) for t in ("a \ud83d", "a \ufffd"))
    assert half == whole
    root = make_videoqa_mc(tmp_path / "mc")
    _rw_jsonl(root, "test.jsonl", lambda r: {**r, "options": [*r["options"], "a \ud83d"]})
    assert {s.candidates[-1] for s in get_task("videoqa_mc").load(str(root), "test")} == {"a \ud83d"}


def test_a_vqa_run_with_half_an_emoji_in_a_question_goes_on(make_model, tmp_path, one_thread):
    root = make_vqa(tmp_path / "vqa")
    _rw_json(
        root,
        "test_questions.json",
        lambda q: {"questions": [{**q["questions"][0], "question": HALF_EMOJI}, *q["questions"][1:]]},
    )
    model, processor = make_model("llama")
    results = evaluate(
        model,
        processor,
        "vqa",
        str(root),
        shots=[0],
        trials=1,
        progress=False,
        generation={"max_new_tokens": 2, "num_beams": 1},
    )
    assert [run["skipped"] for run in results["runs"]] == [0]


def test_a_class_map_beside_jsonl_splits_gives_its_names_as_the_classes(tmp_path):
    """In the JSONL layout labels are class names: a {folder: name} classes.json gave its folders as the candidates."""
    root = make_classification(tmp_path / "cls")
    (root / "classes.json").write_text(json.dumps({"n01": "cat", "n02": "dog", "n03": "red bird", "n04": "blue fish"}))
    task = get_task("classification")
    task.load(str(root), "test")
    assert task.classes == ["cat", "dog", "red bird", "blue fish"]
