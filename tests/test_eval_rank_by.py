"""`rank_by`: a ranked candidate scored by its continuation's summed log-likelihood (the default) or by the mean over
the candidate's own tokens, as OpenFlamingo's evaluate.py ranks ImageNet and HatefulMemes (`normalize_length=True`
in its `get_rank_classifications`: the class name tokenized alone, its tokens' log-probabilities after the prompt
averaged). Equal to OpenFlamingo given the same weights (through our converter)."""

import argparse
import copy
import json

import pytest
import torch

from flamingo.eval import evaluate
from flamingo.eval.classification import ClassificationTask
from flamingo.eval.hateful_memes import HatefulMemesTask
from flamingo.eval.predict import MediaLoader, build_prompt, continuation_ids_of, rank_batch
from flamingo.eval.task import Sample
from flamingo.eval.tasks import get_task
from flamingo.tiny import random_image, tiny_image_processor

# OpenFlamingo's ImageNet prompt (`get_imagenet_prompt`): "<image>Output:{label}<|endofchunk|>"
OF_TEMPLATE = "<image>Output:{answer}<|endofchunk|>"
CLASSES = ["cat", "a red bird", "dog", "the small green frog", "fish", "two black horses"]  # 1 to 5 tokens


def _samples(tmp_path, n):
    paths = []
    for k in range(n):
        path = tmp_path / f"{k}.png"
        random_image(10 + k).save(path)
        paths.append(str(path))
    return [Sample(f"s{k}", [paths[k]], {}, answer=CLASSES[k % len(CLASSES)], label=CLASSES[k % len(CLASSES)])
            for k in range(n)]


def _peer_mean_logprobs(peer, processor, prompt, images, classes):
    """OpenFlamingo's `get_rank_classifications(..., use_cache=False, normalize_length=True)` for one prompt: each
    class name tokenized alone (no special tokens) after the prompt's ids, its tokens' log-probabilities averaged."""
    batch = processor([prompt], images=[images], padding_side="left")
    out = []
    for name in classes:
        name_ids = torch.tensor([processor.tokenizer(name, add_special_tokens=False)["input_ids"]])
        lang_x = torch.cat([batch["input_ids"], name_ids], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(name_ids)], dim=1)
        with torch.no_grad():
            logits = peer(vision_x=batch["images"].clone(), lang_x=lang_x, attention_mask=mask).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)[:, -name_ids.shape[1] - 1:-1]
        out.append(logprobs.gather(2, name_ids[:, :, None]).squeeze(-1).mean().item())
    return out


@pytest.mark.peer
def test_mean_ranking_equals_openflamingos_normalized_class_logprobs(tmp_path):
    pytest.importorskip("einops_exts", reason="the OpenFlamingo peer needs einops-exts")
    from flamingo.convert import convert_openflamingo

    from helpers import openflamingo_peer

    peer, vision, lm, tok = openflamingo_peer(2, lm_kind="mpt")
    ours, processor = convert_openflamingo(copy.deepcopy(peer.state_dict()), copy.deepcopy(vision),
                                           copy.deepcopy(lm), copy.deepcopy(tok),
                                           image_processor=tiny_image_processor("clip"))
    ours.eval()
    task = ClassificationTask(template=OF_TEMPLATE, answer_prefix="", rank_by="mean")
    task.classes = list(CLASSES)
    summed_task = ClassificationTask(template=OF_TEMPLATE, answer_prefix="")
    summed_task.classes = list(CLASSES)
    load = MediaLoader(processor)
    queries, demos = _samples(tmp_path, 3), _samples(tmp_path / "..", 2)
    prompts = [build_prompt(task, q, demos if k else []) for k, q in enumerate(queries)]
    assert prompts[1][0] == "<image>Output:cat<|endofchunk|><image>Output:a red bird<|endofchunk|><image>Output:"
    records = rank_batch(ours, processor, load, task, queries, prompts)
    orders_differ = False
    for (text, media), record in zip(prompts, records):
        # the continuation is the class name's ids alone, as OpenFlamingo tokenizes it
        conts = continuation_ids_of(processor, task, CLASSES, text)
        assert conts == [tok(c, add_special_tokens=False)["input_ids"] for c in CLASSES]
        theirs = _peer_mean_logprobs(peer, processor, text, [load(m) for m in media], CLASSES)
        batch = processor([text], images=[[load(m) for m in media]], padding_side="left")
        summed = ours.score_batch(batch.pop("input_ids"), [conts], **batch)[0].tolist()
        mine = task.candidate_scores(summed, conts)
        assert max(abs(a - b) for a, b in zip(mine, theirs)) <= 1e-5
        best_first = sorted(CLASSES, key=lambda c: -theirs[CLASSES.index(c)])
        assert record["top5"] == best_first[:5]
        by_sum = sorted(CLASSES, key=lambda c: -summed[CLASSES.index(c)])
        orders_differ |= by_sum[:5] != best_first[:5]
    assert orders_differ  # not vacuous: the mean ranks differently from the sum here
    assert summed_task.continuation("cat") == "cat<|endofchunk|>" and task.continuation("cat") == "cat"


def test_mean_scores_the_candidates_own_tokens_in_template_and_chat_prompts():
    from flamingo.chat import IdeficsChat, OtterChat

    task = HatefulMemesTask(rank_by="mean")
    assert task.continuation("yes") == "yes" and HatefulMemesTask().continuation("yes") == "yes<|endofchunk|>"
    task.use_chat(IdeficsChat())
    assert task.continuation("yes") == " yes"
    task.use_chat(OtterChat())
    assert task.continuation("yes") == " yes"
    summed = HatefulMemesTask()
    summed.use_chat(IdeficsChat())
    assert summed.continuation("yes") == " yes<end_of_utterance>\n"
    assert task.candidate_scores([-6.0, -3.0], [[1, 2, 3], [4]]) == [-2.0, -3.0]
    assert summed.candidate_scores([-6.0, -3.0], [[1, 2, 3], [4]]) == [-6.0, -3.0]


def test_a_candidate_that_adds_no_token_is_refused_by_name(tmp_path):
    """With `rank_by="mean"` and no answer prefix, an empty class name is no continuation at all: refused (in-process
    and through a server alike, both use `continuation_ids_of`), not scored as 0 or a mean of nothing."""
    from flamingo.tiny import tiny_flamingo

    _, processor = tiny_flamingo()
    task = ClassificationTask(template=OF_TEMPLATE, answer_prefix="", rank_by="mean")
    with pytest.raises(ValueError, match=r"the candidate '' adds no token after the prompt"):
        continuation_ids_of(processor, task, ["cat", ""], "<image>Output:")


def test_rank_by_is_checked_and_only_ranked_tasks_take_it():
    with pytest.raises(ValueError, match="rank_by must be one of"):
        get_task("classification", rank_by="max")
    with pytest.raises(ValueError, match="rank_by applies to ranked tasks; vqa generates"):
        get_task("vqa", rank_by="mean")
    for name in ("classification", "hateful_memes", "mme", "videoqa_mc", "visdial"):
        assert get_task(name).rank_by == "sum" and get_task(name, rank_by="mean").rank_by == "mean"


@pytest.mark.usefixtures("one_thread")
def test_evaluate_and_the_cli_record_and_apply_rank_by(tmp_path):
    """`flamingo eval --rank-by mean` reaches the task, results.json records it, and HatefulMemes' log-odds are
    those of the two candidates' mean log-likelihoods."""
    from flamingo.eval.cli import add_eval_subcommand
    from flamingo.tiny import tiny_flamingo

    from helpers import make_hateful_memes

    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    data = make_hateful_memes(tmp_path / "data")
    parser = argparse.ArgumentParser()
    add_eval_subcommand(parser.add_subparsers(dest="command"))
    log_odds = {}
    for rank_by in ("mean", None):
        out = tmp_path / f"out_{rank_by}"
        argv = ["eval", "--model", str(tmp_path / "model"), "--task", "hateful_memes", "--data", str(data),
                "--shots", "0", "--trials", "1", "--out", str(out), "--no-progress"]
        args = parser.parse_args(argv + (["--rank-by", rank_by] if rank_by else []))
        assert args.func(args) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["settings"]["rank_by"] == (rank_by or "sum")
        [predictions] = (out / "predictions").glob("*.jsonl")
        log_odds[rank_by] = [json.loads(line)["log_odds"] for line in predictions.read_text().splitlines()]
    # "yes" and "no" alone (1 token each, mean = sum) against "yes<|endofchunk|>" and "no<|endofchunk|>"
    assert log_odds["mean"] != log_odds[None]
    with pytest.raises(ValueError, match="rank_by"):
        evaluate(model, processor, HatefulMemesTask(), str(data), rank_by="mean")
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--task", "vqa", "--data", "d", "--rank-by", "max"])
    args = parser.parse_args(["eval", "--model", str(tmp_path / "absent"), "--task", "vqa", "--data", "d",
                              "--rank-by", "mean"])
    with pytest.raises(ValueError, match="--rank-by applies to ranked tasks; vqa generates"):  # before any load
        args.func(args)
