"""The multi-image task: each sample declares its images, the prompt numbers them on through the demos, a question
names one by reference, and an evaluation scores exact matches."""

from __future__ import annotations

import json

import pytest

from flamingo.eval.multi_image import MultiImagePlainTask, MultiImageTask, renumber
from flamingo.eval.predict import build_prompt
from flamingo.eval.runner import evaluate
from flamingo.references import resolve_declarations
from flamingo.tiny import random_image


def _write(root, n: int, split: str, images: int = 2):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{split}.jsonl", "w") as f:
        for i in range(n):
            names = []
            for k in range(images + i % 2):  # 2 or 3 images
                name = f"{split}{i}_{k}.png"
                random_image(100 * i + k + (0 if split == "train" else 50)).save(root / name)
                names.append(name)
            f.write(json.dumps({"id": f"{split}{i}", "images": names, "type": "colour" if i % 2 else "shape",
                                "question": f"what is in <image{i % len(names)}>?", "answer": f"a{i}"}) + "\n")


def test_prompts_declare_each_samples_images_and_number_them_on_through_the_demos(tmp_path):
    _write(tmp_path, 3, "train")
    _write(tmp_path, 2, "test")
    task = MultiImageTask()
    pool, test = task.load(str(tmp_path), "train"), task.load(str(tmp_path), "test")
    text, media = build_prompt(task, test[1], pool[:2])
    assert text == ("Image 0 is <image0>. Image 1 is <image1>. Question:what is in <image0>? Short answer:a0"
                    "<|endofchunk|>Image 2 is <image2>. Image 3 is <image3>. Image 4 is <image4>. Question:what is in "
                    "<image3>? Short answer:a1<|endofchunk|>Image 5 is <image5>. Image 6 is <image6>. Image 7 is "
                    "<image7>. Question:what is in <image6>? Short answer:")
    assert media == pool[0].media + pool[1].media + test[1].media
    assert resolve_declarations(text, len(media), 16).count("<image>") == 8  # the processor accepts it
    text_only, _ = build_prompt(task, test[0], pool[:1], with_media=False)
    assert text_only.startswith("Question:what is in image 0? Short answer:a0<|endofchunk|>Image 0 is <image0>.")
    assert renumber("Is <image1> like Image 0 is <image0>?", 2) == "Is <image3> like Image 2 is <image2>?"
    plain, _ = build_prompt(MultiImagePlainTask(), test[1], pool[:2])  # the same prompt, references in words
    assert plain == text.replace("in <image0>?", "in image 0?").replace("in <image3>?", "in image 3?").replace(
        "in <image6>?", "in image 6?")


def test_a_question_about_an_image_the_record_lacks_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    random_image(0).save(tmp_path / "a.png")
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": 1, "images": ["a.png"], "question": "is <image1> red?",
                                                     "answer": "no"}) + "\n")
    with pytest.raises(ValueError, match="refers to image 1 but the record has 1 image"):
        MultiImageTask().load(str(tmp_path), "test")


def test_evaluation_scores_exact_matches_and_needs_enough_reference_tokens(make_model, tmp_path, one_thread):
    _write(tmp_path, 4, "train")
    _write(tmp_path, 3, "test")
    model, processor = make_model("llama", num_image_references=12)
    results = evaluate(model, processor, "multi_image", str(tmp_path), shots=[0, 2], trials=1, batch_size=2,
                       out_dir=str(tmp_path / "out"), progress=False)
    for run in results["runs"]:
        path = tmp_path / "out" / "predictions" / f"multi_image_{run['shots']}shot_trial0.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == 3
        hits = [r["prediction"] == f"a{int(r['id'][4:])}" for r in records]
        assert run["metrics"]["accuracy"] == pytest.approx(100 * sum(hits) / 3)
        assert {"accuracy/colour", "accuracy/shape"} <= set(run["metrics"])
    with pytest.raises(ValueError, match="declares up to 12 images a prompt, but the model has reference tokens for 0"):
        plain_model, plain_processor = make_model("llama")
        evaluate(plain_model, plain_processor, "multi_image", str(tmp_path), shots=[3], trials=1, progress=False)


def test_n_way_episodes_count_every_demo_against_the_reference_tokens(make_model, tmp_path, one_thread):
    """3 shots of a 2-way episode show 6 two-image demos and the query: 14 images, past 12 reference tokens, are refused
    before the first query (not at the first 3-shot batch, after the smaller shot counts ran)."""
    for i in range(7):
        for k in range(2):
            random_image(10 * i + k).save(tmp_path / f"{i}_{k}.png")
    rows = [{"id": str(i), "images": [f"{i}_0.png", f"{i}_1.png"], "question": "is <image0> like <image1>?",
             "answer": "yes" if i % 2 else "no"} for i in range(7)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    test = {**rows[6], "demo_ids": [str(i) for i in range(6)], "ways": 2}
    (tmp_path / "test.jsonl").write_text(json.dumps(test) + "\n")
    model, processor = make_model("llama", num_image_references=12)
    with pytest.raises(ValueError, match="at 3 shots declares up to 14 images a prompt, but the model has reference "
                                         "tokens for 12"):
        evaluate(model, processor, "multi_image", str(tmp_path), shots=[1, 3], trials=1, out_dir=str(tmp_path / "out"),
                 progress=False)
    assert not (tmp_path / "out" / "predictions").exists()
    ran = evaluate(model, processor, "multi_image", str(tmp_path), shots=[2], trials=1, progress=False,
                   generation={"max_new_tokens": 2, "num_beams": 1})  # 10 images: within the 12
    assert ran["runs"][0]["skipped"] == 0
