"""The Flamingo paper's remaining benchmark kinds: VisDial (NDCG as VisDial's evaluation computes it, the ground truth's
rank), multiple-choice video QA (STAR / NExT-QA) and iVQA's accuracy over five human answers."""

import random

import pytest
import torch

from flamingo.eval.tasks import get_task
from flamingo.eval.videoqa import answer_score
from flamingo.eval.visdial import ndcg

from helpers import make_videoqa_mc, make_visdial, write_jsonl


def official_ndcg(scores: torch.Tensor, relevance: torch.Tensor) -> float:
    """VisDial's evaluation (visdial-challenge-starter's `NDCG.observe` for one round), restated with torch."""
    order = scores.sort(descending=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order))
    k = int((relevance != 0).sum())
    rankings = ranks.sort().indices
    best = relevance.sort(descending=True).indices

    def dcg(ranking):
        return float((relevance[ranking].float() / torch.log2(torch.arange(len(ranking)).float() + 2)).sum())

    return dcg(rankings[:k]) / dcg(best[:k])


def test_visdial_ndcg_is_the_official_computation():
    rng = random.Random(0)
    for _ in range(50):
        relevance = torch.tensor([rng.choice([0.0, 0.0, 0.5, 1.0]) for _ in range(100)])
        relevance[rng.randrange(100)] = 1.0  # at least one relevant option
        scores = torch.randn(100, generator=torch.Generator().manual_seed(rng.randrange(10**6)))
        order = sorted(range(100), key=lambda i: -float(scores[i]))
        assert ndcg(relevance.tolist(), order) == pytest.approx(official_ndcg(scores, relevance), abs=1e-6)  # float32
    assert ndcg([0.0, 1.0, 0.5], [1, 2, 0]) == pytest.approx(1.0)  # the ideal order
    # relevant options 1 (1.0) and 2 (0.5), k = 2: ranked 0, 1 -> (0 + 1/log2(3)) / (1 + 0.5/log2(3))
    assert ndcg([0.0, 1.0, 0.5], [0, 1, 2]) == pytest.approx((1 / 1.5849625) / (1 + 0.5 / 1.5849625), rel=1e-6)


def test_visdial_rounds_ranks_and_metrics(tmp_path):
    task = get_task("visdial")
    data = make_visdial(tmp_path / "data")
    test, train = task.load(str(data), "test"), task.load(str(data), "train")
    # every round of every val dialog (VisDial's R@k, MRR, mean rank), relevance on the dense ones; a round per dialog
    assert [s.id for s in test] == [f"{i}_{r}" for i in (10, 11, 12) for r in (1, 2, 3)] and len(train) == 4
    assert [s.id for s in test if s.label["relevance"] is not None] == ["10_2", "12_3"]
    second = test[1]
    assert second.fields["history"].startswith("Question: is it ") and second.fields["history"].count("Question") == 1
    assert len(second.candidates) == 5 and second.candidates[second.label["gt_index"]] == second.answer
    prompt = task.query_prompt(second)
    assert prompt.startswith("<image>Caption: a ") and prompt.endswith("? Answer:")
    # scores putting the ground truth third, after the two most relevant other options
    gt, relevance = second.label["gt_index"], second.label["relevance"]
    others = sorted((i for i in range(5) if i != gt), key=lambda i: -relevance[i])
    order = others[:2] + [gt] + others[2:]
    scores = [0.0] * 5
    for place, option in enumerate(order):
        scores[option] = -place
    record = task.from_scores(second, second.candidates, scores)
    assert record["rank"] == 3 and record["prediction"] == second.candidates[others[0]]
    assert record["ndcg"] == pytest.approx(ndcg(relevance, order)) and 0 < record["ndcg"] < 1
    metrics = task.compute_metrics([second, second], [record, {**record, "rank": 1, "ndcg": 0.5}])
    assert metrics["r@1"] == 50.0 and metrics["mrr"] == pytest.approx(100 * (1 / record["rank"] + 1) / 2)
    assert metrics["ndcg"] == pytest.approx(100 * (record["ndcg"] + 0.5) / 2) and metrics["r@10"] == 100.0
    # the ground truth first in the 2 annotated rounds, last in the 7 others: R@k, MRR and mean rank over all 9
    # rounds, NDCG over the annotated 2
    sign = {s.id: 1.0 if s.label["relevance"] is not None else -1.0 for s in test}
    records = [task.from_scores(s, s.candidates, [sign[s.id] * (i == s.label["gt_index"]) for i in range(5)])
               for s in test]
    metrics = task.compute_metrics(test, records)
    assert sorted(r["rank"] for r in records) == [1, 1] + [5] * 7 and sum("ndcg" in r for r in records) == 2
    assert metrics["r@1"] == pytest.approx(200 / 9) and metrics["mean_rank"] == pytest.approx(37 / 9)
    assert metrics["mrr"] == pytest.approx(100 * (2 + 7 / 5) / 9) and metrics["r@5"] == 100.0
    assert metrics["ndcg"] == pytest.approx(100 * sum(r.get("ndcg", 0) for r in records) / 2)

    undense = make_visdial(tmp_path / "plain", dense=False)
    every = task.load(str(undense), "test")
    assert len(every) == 9 and all(s.label["relevance"] is None for s in every)  # every round, no NDCG
    assert task.compute_metrics(every[:1], [task.from_scores(every[0], every[0].candidates, [0, 1, 2, 3, 4])])[
        "ndcg"] is None


def test_multiple_choice_video_qa_reads_answers_by_index_or_text_and_reports_types(tmp_path):
    task = get_task("videoqa_mc")
    data = make_videoqa_mc(tmp_path / "data")
    samples = task.load(str(data), "test")
    assert all(s.answer in s.candidates for s in samples) and {s.kind for s in samples} == {"interaction",
                                                                                         "sequence"}
    preds = [{"prediction": s.answer if i else "wrong"} for i, s in enumerate(samples)]
    metrics = task.compute_metrics(samples, preds)
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    assert set(metrics) == {"accuracy", "accuracy/interaction", "accuracy/sequence"}
    assert task.continuation("red") == " red<|endofchunk|>"
    for bad, message in (({"answer": 5}, "outside its 3 options"), ({"answer": "green"}, "not one of its options")):
        write_jsonl(tmp_path / "bad" / "test.jsonl", [{"id": 1, "video": "v.mp4", "question": "q?",
                                                         "options": ["a", "b", "c"], **bad}])
        with pytest.raises(ValueError, match=message):
            task.load(str(tmp_path / "bad"), "test")


def test_ivqa_accuracy_counts_two_agreeing_humans_as_right():
    five = ["Dog", "dog", "puppy", "cat", "dog."]
    assert answer_score("dog", five) == 1.0  # 3 say dog: min(1, 3/2)
    assert answer_score("a puppy", five) == 0.5  # 1 says puppy (articles dropped)
    assert answer_score("horse", five) == 0.0
    assert answer_score("Dog", ["dog"]) == 1.0 and answer_score("cat", ["dog"]) == 0.0  # one answer: exact match
