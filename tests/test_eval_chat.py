"""Evaluation in the model's chat format (`flamingo eval --chat`, docs/eval.md): demos become user / assistant turns
and the query a last user turn, written as the server writes chats; ranked candidates are scored as the assistant's
answer and end marker; tasks that declare their images have no chat prompts."""

from __future__ import annotations

import pytest

from flamingo.chat import FLAMINGO, OTTER, IdeficsChat, Turn, pieces_of
from flamingo.eval import evaluate
from flamingo.eval.predict import build_prompt
from flamingo.eval.task import Sample
from flamingo.eval.tasks import get_task

from helpers import make_classification, make_vqa, tiny_otter_shaped

pytestmark = pytest.mark.usefixtures("one_thread")


def _vqa_samples():
    return [Sample(f"s{k}", [f"/img/{k}.png"], {"question": q}, answer=a)
            for k, (q, a) in enumerate([("what colour?", "red"), ("how many?", "two"), ("what shape?", "")])]


def test_demos_and_query_are_turns_of_the_models_chat_format():
    vqa = get_task("vqa")
    demo1, demo2, query = _vqa_samples()
    vqa.use_chat(OTTER)
    text, media = build_prompt(vqa, query, [demo1, demo2])
    assert text == ("<image>User: Question:what colour? Short answer: GPT:<answer> red<|endofchunk|>"
                    "<image>User: Question:how many? Short answer: GPT:<answer> two<|endofchunk|>"
                    "<image>User: Question:what shape? Short answer: GPT:<answer>")
    assert media == ["/img/0.png", "/img/1.png", "/img/2.png"]
    text, media = build_prompt(vqa, query, [demo1], with_media=False)  # the zero-shot convention's text-only demos
    assert text.startswith("User: Question:what colour?") and media == ["/img/2.png"]
    # each format writes the same conversation its own way: the server's rendering of those turns
    turns = [Turn("user", ("<image>", "Question:what colour? Short answer:")), Turn("assistant", ("red",)),
             Turn("user", ("<image>", "Question:what shape? Short answer:"))]
    for fmt in (FLAMINGO, IdeficsChat()):
        vqa.use_chat(fmt)
        assert build_prompt(vqa, query, [demo1])[0] == fmt.render(turns)
    vqa.use_chat(None)
    assert build_prompt(vqa, query, [demo1])[0] == vqa.demo_prompt(demo1) + "\n" + vqa.query_prompt(query)


def test_ranked_candidates_are_the_assistants_answer_and_end_marker():
    task = get_task("classification")
    assert task.continuation("cat") == " cat.<|endofchunk|>"  # the template's
    task.use_chat(OTTER)
    assert task.continuation("cat") == " cat<|endofchunk|>"  # after "... GPT:<answer>"
    task.use_chat(IdeficsChat())
    assert task.continuation("cat") == " cat<end_of_utterance>\n"  # after "Assistant:"
    task.use_chat(FLAMINGO)
    assert task.continuation("cat") == " cat<|endofchunk|>"
    with pytest.raises(ValueError, match="declares its images"):
        get_task("multi_image").use_chat(OTTER)


@pytest.mark.parametrize("task, maker", [("vqa", make_vqa), ("classification", make_classification)])
def test_evaluate_with_chat_prompts_records_the_format(task, maker, tmp_path, monkeypatch):
    import flamingo.eval.runner as runner

    prompts = []

    def spy(*args, **kwargs):
        prompts.append(build_prompt(*args, **kwargs)[0])
        return build_prompt(*args, **kwargs)

    monkeypatch.setattr(runner, "build_prompt", spy)
    model, processor = tiny_otter_shaped()
    data = maker(tmp_path / "data")
    common = dict(shots=[0, 2], trials=1, batch_size=2, progress=False, generation={"max_new_tokens": 3})
    chat = evaluate(model, processor, task, str(data), out_dir=str(tmp_path / "chat"), chat=True, **common)
    chat_prompts, prompts[:] = list(prompts), []
    plain = evaluate(model, processor, task, str(data), out_dir=str(tmp_path / "plain"), **common)
    assert chat["settings"]["chat"] == "otter" and plain["settings"]["chat"] is None
    assert len(chat["runs"]) == 2 and all(run["metrics"] for run in chat["runs"])
    assert chat_prompts and all(p.endswith(" GPT:<answer>") and p.count("User: ") in (1, 3) for p in chat_prompts)
    assert prompts and not any("GPT:<answer>" in p for p in prompts)


def test_a_task_instance_evaluated_again_starts_from_its_template_and_fresh_token_ids(tmp_path, monkeypatch):
    """`evaluate(task_instance, chat=True)` then `chat=False`: the second run writes template prompts and says so;
    the continuation ids cached for the first processor are dropped (another model's tokenizer splits otherwise)."""
    model, processor = tiny_otter_shaped()
    data = make_classification(tmp_path / "data")
    task = get_task("classification")
    common = dict(shots=[0], trials=1, batch_size=2, progress=False)
    evaluate(model, processor, task, str(data), out_dir=str(tmp_path / "chat"), chat=True, **common)
    task.continuation_ids.put(("stale query", "stale"), [10**9])  # as another tokenizer's ids would be
    plain = evaluate(model, processor, task, str(data), out_dir=str(tmp_path / "plain"), **common)
    assert plain["settings"]["chat"] is None and task.chat is None
    assert task.continuation_ids.get(("stale query", "stale")) is None


@pytest.mark.parametrize("template", ["<image>A photo of a {answer}", "<image>A photo of a\n{answer}",
                                      "<image>A photo of a{answer}"])
def test_a_ranked_candidate_is_scored_as_a_demo_with_that_answer_is_written(template):
    """The scored continuation follows the query as a demo's answer follows its question: no second space after a
    query that ends in one (the format leaves it to the answer's gap), none after a line break."""
    from flamingo.eval.predict import continuation_ids_of
    from flamingo.tiny import tiny_flamingo

    processor = tiny_flamingo()[1]
    task = get_task("classification", template=template)
    task.use_chat(FLAMINGO)
    demo, query = Sample("d", ["/a.png"], {}, answer="dog"), Sample("q", ["/b.png"], {}, answer="cat")
    prompt = build_prompt(task, query, [demo])[0]
    (ids,) = continuation_ids_of(processor, task, ["cat"], prompt)
    solved = [Turn("user", pieces_of(task.query_prompt(demo))), Turn("assistant", ("dog",)),
              Turn("user", pieces_of(task.query_prompt(query))), Turn("assistant", ("cat",))]
    written = "".join(text for text, _ in FLAMINGO.segments(solved))
    assert written.endswith("A photo of a" + ("\n" if "\n" in template else " ") + "cat<|endofchunk|>")
    assert prompt + processor.tokenizer.decode(ids) == written
    assert processor.prompt_ids(prompt) + ids == processor.prompt_ids(written)


@pytest.mark.parametrize("remote", [False, True])
def test_generated_chat_answers_end_at_the_formats_stop_strings(remote, tmp_path, monkeypatch):
    """A chat answer is cut where the server cuts it (mmgpt's `### End.`) before the task's postprocessing, in-process
    and through a server's completions: their requests carry the format's stop strings, and an answer is cut here
    all the same (a server that ignores `stop` runs on past them); the record's `raw` is the cut answer either way."""
    import json

    import torch

    from flamingo.eval.remote import RemoteModel
    from flamingo.processing import FlamingoProcessor
    from flamingo.tiny import tiny_flamingo

    model, tiny = tiny_flamingo()
    processor = FlamingoProcessor(tiny.tokenizer, tiny.image_processor, template="mmgpt")
    answer = "red### End. blue"
    sent = []

    class Served(RemoteModel):  # a server that ignores `stop`: its completions run on past the stop strings
        def positions(self):
            return None

        def max_images(self):
            return None

        def _post_all(self, path, bodies):
            sent.extend(bodies)
            return [{"choices": [{"index": 0, "text": answer}]} for _ in bodies]

    if remote:
        predictor = Served("http://unused")
    else:
        ids = torch.tensor(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
        monkeypatch.setattr(model, "generate", lambda input_ids, **kwargs: torch.cat(
            [input_ids, ids.expand(len(input_ids), -1)], dim=1))
        predictor = model
    out = tmp_path / "out"
    evaluate(predictor, processor, "vqa", str(make_vqa(tmp_path / "data")), out_dir=str(out), chat=True, shots=[0],
             trials=1, batch_size=2, progress=False, generation={"num_beams": 1})  # a server decodes greedily
    records = [json.loads(line) for line in (out / "predictions" / "vqa_0shot_trial0.jsonl").read_text().splitlines()]
    assert records and all(r["prediction"] == "red" and r["raw"] == "red" for r in records)
    assert len(sent) == (len(records) if remote else 0)
    assert all(body["stop"] == ["\n\n### Instruction:", "### End."] for body in sent)
