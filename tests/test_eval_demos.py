"""Demo selection and prediction internals: RICES nearest neighbours (most similar last) on fixture features and on
the model's own pooled vision features; random demos reproducible per (seed, sample); rank classification = argmax
of plain-forward log-probs; distributed sharding + gathering (simulated, and two real gloo ranks == one process)."""

import copy
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import flamingo_demo.evaluate as demo_evaluate
from flamingo import load_pretrained
from flamingo.eval import evaluate, rices, runner
from flamingo.eval.classification import ClassificationTask
from flamingo.eval.demos import RANDOM_QUERY_SET, DemoSelector, prompt_demos
from flamingo.eval.distributed import gather_by_index, shard
from flamingo.eval.predict import MediaLoader, build_prompt, generate_batch, needed_tokens, rank_batch
from flamingo.eval.rices import FeatureCache, nearest, pooled_features
from flamingo.eval.task import Sample, ways_of
from flamingo.eval.tasks import get_task
from flamingo.eval.vqa import VQATask
from flamingo.model.backbones import vision_features
from flamingo.tiny import (
    random_image,
    tiny_flamingo,
)

from helpers import (
    continuation_logprobs_reference,
    make_captioning,
    make_classification,
    make_videoqa,
    make_vqa,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_and_processor():
    model, processor = tiny_flamingo()
    return model.eval(), processor


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_nearest_returns_the_k_most_similar_most_similar_last():
    pool = _unit(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0], [0.9, 0.3]]))
    query = _unit(torch.tensor([[1.0, 0.1], [0.0, 1.0]]))
    # query 0: cos with pool = [.995, .0995, .778, -.995, .995*.949+.0995*.316=~.976] -> order 0, 4, 2
    assert nearest(query, pool, 3)[0].tolist() == [2, 4, 0]
    # query 1: [0, 1, .707, 0, .316] -> order 1, 2, 4
    assert nearest(query, pool, 3)[1].tolist() == [4, 2, 1]
    brute = (query @ pool.T).argsort(dim=-1, descending=True)[:, :2].flip(-1)
    assert torch.equal(nearest(query, pool, 2), brute)
    assert nearest(query, pool, 0).shape == (2, 0)
    with pytest.raises(ValueError):
        nearest(query, pool, 6)


def test_nearest_puts_a_zero_row_after_every_other():
    """A demo whose image cannot be read has a zero feature: even a dissimilar demo (negative cosine) comes first."""
    pool = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    assert nearest(torch.tensor([[-1.0, 0.0]]), pool, 2).tolist() == [[0, 2]]
    assert nearest(torch.tensor([[-1.0, 0.0]]), pool, 3).tolist() == [[1, 0, 2]]


def _samples(n, prefix="t", media=None):
    return [Sample(id=f"{prefix}{i}", media=[media[i] if media else f"{prefix}{i}.png"], fields={"question": "q"},
                   answer="a") for i in range(n)]


class PresetFeatures(FeatureCache):
    """Features looked up from a table by medium path (fixture features, no model)."""

    def __init__(self, table):
        self.table, self.features = table, {}

    def get(self, first_media, shared=False):  # one process: nothing to share
        return torch.stack([self.table[m] for m in first_media])


def test_rices_selector_returns_true_neighbours():
    torch.manual_seed(0)
    pool = _samples(20, "p")
    query = _samples(3, "q")
    table = {s.media[0]: _unit(torch.randn(8)) for s in pool + query}
    selector = DemoSelector(pool, "rices", query_set_size=None, features=PresetFeatures(table))
    pool_feats = torch.stack([table[s.media[0]] for s in pool])
    for i, s in enumerate(query):
        sims = pool_feats @ table[s.media[0]]
        expected = [pool[j].id for j in sims.argsort(descending=True)[:4].tolist()][::-1]  # most similar last
        assert [d.id for d in selector.select(s, i, 4)] == expected
    # a query set restricts the candidates: demos only from it
    small = DemoSelector(pool, "rices", query_set_size=5, seed=1, features=PresetFeatures(table))
    allowed = {s.id for s in small.query_set}
    assert len(allowed) == 5 and all(d.id in allowed for d in small.select(query[0], 0, 3))


def test_tied_neighbours_are_taken_lowest_index_first_whatever_k():
    """Samples showing one image tie exactly (VQAv2's questions of an image): the k nearest are the first k of one
    order (similarity, then index), so asking for more (a batch whose other queries are in the pool) changes none
    of a query's demos. `topk` alone took another subset of the tied ones for another k."""
    torch.manual_seed(0)
    base = [_unit(torch.randn(16)) for _ in range(4)]
    pool = torch.stack([base[i] for i in (1, 0, 2, 0, 0, 3, 0, 0, 1, 0, 0, 0, 0, 2, 0, 3, 1, 2, 3, 1)])  # 10 of image 0
    query = (base[0] + 1e-3 * torch.randn(16)).unsqueeze(0)  # nearest to image 0
    tied = [i for i in range(20) if torch.equal(pool[i], base[0])]
    full = nearest(query, pool, 20)[0].flip(0).tolist()  # most similar first
    assert full[:len(tied)] == tied
    for k in range(1, 21):
        assert nearest(query, pool, k)[0].flip(0).tolist() == full[:k], k
    with_nan = pool.clone()
    with_nan[1] = float("nan")  # an unreadable feature: last, whatever the others
    assert nearest(query, with_nan, 20)[0][0].item() == 1


def test_pooled_features_are_the_models_mean_pooled_patch_features(model_and_processor):
    model, processor = model_and_processor
    media = [processor.preprocess_media(random_image(i)) for i in range(3)]
    media.append(processor.preprocess_media([random_image(7), random_image(8)]))  # a 2-frame video
    got = pooled_features(model, media, batch_size=2)
    with torch.no_grad():
        feats = [vision_features(model.vision, m, model.config.vision_feature_layer,
                                 model.config.drop_cls_token).mean(dim=(0, 1)) for m in media]
    assert torch.allclose(got, _unit(torch.stack(feats)), atol=1e-5)


def test_random_demos_depend_only_on_seed_and_sample_index():
    pool, query = _samples(30, "p"), _samples(4, "q")
    a = DemoSelector(pool, "random", query_set_size=10, seed=0)
    b = DemoSelector(pool, "random", query_set_size=10, seed=0)
    c = DemoSelector(pool, "random", query_set_size=10, seed=1)
    assert [s.id for s in a.query_set] == [s.id for s in b.query_set] != [s.id for s in c.query_set]
    picks = [[d.id for d in a.select(s, i, 4)] for i, s in enumerate(query)]
    assert picks == [[d.id for d in b.select(s, i, 4)] for i, s in enumerate(query)]
    assert all(len(set(p)) == 4 and set(p) <= {s.id for s in a.query_set} for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # different samples, different demos
    demos, with_media = prompt_demos(a, query[0], 0, 0, "text")
    assert len(demos) == 2 and not with_media
    assert prompt_demos(a, query[0], 0, 0, "none") == ([], True)


def test_a_query_is_never_its_own_demo():
    """A pool sample showing the query's first media file is passed over by random and RICES demos (RICES would rank
    it first); one that only shares its id (splits number their samples each from 0) is another sample, and a query
    without its own copy draws exactly as before."""
    pool = _samples(6, "p")
    same_image = Sample(id="q", media=["p4.png"], fields={"question": "q"}, answer="a")
    same_id = Sample(id="p2", media=["elsewhere.png"], fields={"question": "q"}, answer="a")
    selector = DemoSelector(pool, "random", query_set_size=None, seed=0)
    for index in range(20):
        assert "p4" not in [d.id for d in selector.select(same_image, index, 5)]
    assert "p2" in [d.id for d in selector.select(same_id, 0, 6)]
    with pytest.raises(ValueError, match="holds 5 samples other than 'q'"):
        selector.select(same_image, 0, 6)
    other = _samples(1, "q")[0]
    drawn = np.random.default_rng([0, 3]).choice(6, size=4, replace=False)
    assert [d.id for d in selector.select(other, 3, 4)] == [pool[i].id for i in drawn]
    copy = Sample(id="c", media=["p1.png"], fields={"question": "q"}, answer="a")
    demos, _ = prompt_demos(DemoSelector(pool[1:3], "random", seed=0), copy, 0, 0, "text")
    assert [d.id for d in demos] == ["p2"]  # the zero-shot text demos too: one left of two

    torch.manual_seed(0)
    table = {s.media[0]: _unit(torch.randn(8)) for s in pool}
    table["q0.png"] = _unit(torch.randn(8))
    own = Sample(id="q", media=["p2.png"], fields={"question": "q"}, answer="a")  # the pool's p2 itself
    rices = DemoSelector(pool, "rices", query_set_size=None, features=PresetFeatures(table))
    sims = torch.stack([table[s.media[0]] for s in pool]) @ table["p2.png"]
    expected = [pool[j].id for j in sims.argsort(descending=True)[1:4].tolist()][::-1]  # the 3 nearest but itself
    assert [d.id for d in rices.select(own, 0, 3)] == expected
    assert [[d.id for d in row] for row in rices.select_rices([own, other], 3)][0] == expected


def test_evaluate_warns_once_when_the_splits_overlap_and_keeps_each_query_out_of_its_demos(model_and_processor,
                                                                                           tmp_path):
    model, processor = model_and_processor
    data = make_vqa(tmp_path / "data")
    for kind in ("questions", "annotations"):  # the train split a copy of the test split
        (data / f"train_{kind}.json").write_text((data / f"test_{kind}.json").read_text())
    quick = dict(trials=1, batch_size=5, progress=False, generation={"max_new_tokens": 2, "num_beams": 1})
    with pytest.warns(UserWarning, match="5 of 5 evaluated samples are also in the train split") as caught:
        evaluate(model, processor, "vqa", str(data), shots=[0, 1, 4], demos="rices", out_dir=str(tmp_path / "out"),
                 **quick)
    assert sum("also in the train split" in str(w.message) for w in caught) == 1
    for k in (0, 1, 4):
        lines = (tmp_path / "out" / "predictions" / f"vqa_{k}shot_trial0.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == 5 and all(r["id"] not in r["demo_ids"] for r in records)
        assert all(len(r["demo_ids"]) == (k or 2) for r in records)
    with pytest.raises(ValueError, match="5 shots asked, but the query set holds 5 demos .*up to 1 of them a query"):
        evaluate(model, processor, "vqa", str(data), shots=[5], **quick)


def test_episode_takes_its_first_demo_ids_in_order_and_refuses_unknown_ones():
    pool = _samples(6, "p")
    sample = Sample(id="q", media=["q.png"], fields={"question": "q"}, answer="a", demo_ids=["p4", "p1", "p3"])
    selector = DemoSelector(pool, "random", query_set_size=2, seed=0)
    assert [d.id for d in selector.select(sample, 0, 2)] == ["p4", "p1"]
    with pytest.raises(ValueError):
        selector.select(sample, 0, 4)
    sample.demo_ids = ["p4", "nope"]
    with pytest.raises(ValueError, match="not in the train split"):
        selector.select(sample, 0, 2)


def test_n_way_episodes_count_shots_per_class():
    """An n-way episode (concept binding): one shot is one demo of each class, so k shots are k * n demos; the
    zero-shot text demos stay two, whatever a shot holds."""
    pool = _samples(8, "p")
    ids = ["p0", "p1", "p2", "p3", "p4", "p5"]  # shots (p0, p1, p2) and (p3, p4, p5) of a 3-way episode
    sample = Sample(id="q", media=["q.png"], fields={"question": "q"}, answer="a", demo_ids=ids, ways=3)
    selector = DemoSelector(pool, "random", query_set_size=2, seed=0)
    assert [d.id for d in selector.select(sample, 0, 1)] == ids[:3]
    assert [d.id for d in selector.select(sample, 0, 2)] == ids
    with pytest.raises(ValueError, match="3 demos a shot"):
        selector.select(sample, 0, 3)
    demos, with_media = prompt_demos(selector, sample, 0, 0, "text")
    assert [d.id for d in demos] == ids[:2] and not with_media
    demos, with_media = prompt_demos(selector, sample, 0, 1, "text")
    assert [d.id for d in demos] == ids[:3] and with_media


def test_ways_of_accepts_a_positive_int_with_demo_ids_only():
    assert ways_of({"id": "q", "demo_ids": ["a", "b"], "ways": 2}) == 2
    assert ways_of({"id": "q", "demo_ids": ["a"]}) is None
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="positive integer"):
            ways_of({"id": "q", "demo_ids": ["a"], "ways": bad})
    with pytest.raises(ValueError, match="no 'demo_ids'"):
        ways_of({"id": "q", "ways": 2})


def test_prompts_fill_the_template_and_list_demo_media_before_the_query():
    task = ClassificationTask()
    demo = Sample(id="d", media=["d.png"], fields={}, answer="cat")
    query = Sample(id="q", media=["q.png"], fields={}, answer="dog")
    assert build_prompt(task, query, [demo]) == ("<image>This is a cat.<|endofchunk|><image>This is a",
                                                 ["d.png", "q.png"])
    assert build_prompt(task, query, [demo], with_media=False) == ("This is a cat.<|endofchunk|><image>This is a",
                                                                   ["q.png"])
    assert task.continuation("red bird") == " red bird.<|endofchunk|>"
    vqa = VQATask()
    sample = Sample(id="v", media=["v.png"], fields={"question": "What {colour}?"}, answer="red")
    assert vqa.demo_prompt(sample) == "<image>Question:What {colour}? Short answer:red<|endofchunk|>"
    assert vqa.query_prompt(sample) == "<image>Question:What {colour}? Short answer:"
    custom = ClassificationTask(template="<image>Output:{answer}<|endofchunk|>", answer_prefix="")
    assert custom.continuation("cat") == "cat<|endofchunk|>" and custom.demo_prompt(demo) == \
        "<image>Output:cat<|endofchunk|>"
    with pytest.raises(ValueError, match="answer"):
        VQATask(template="<image>Question:{question}{answer}{answer}")
    with pytest.raises(ValueError, match="image"):
        VQATask(template="Question:{question} Short answer:{answer}")


def test_rank_classification_is_argmax_of_forward_logprobs(model_and_processor, tmp_path):
    """Two queries ranked in one left-padded batch (prompts of different lengths and image counts, candidate sets of
    different sizes) rank as the plain forward's log-probs of each query alone do."""
    model, processor = model_and_processor
    task = ClassificationTask()
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        random_image(i).save(paths[-1])
    demo = Sample(id="d", media=[paths[0]], fields={}, answer="red bird")
    task.classes = ["cat", "dog", "red bird", "blue fish", "yes", "no", "two cats"]
    samples = [Sample(id="q", media=[paths[1]], fields={}, answer="dog"),
               Sample(id="r", media=[paths[2]], fields={}, answer="dog", candidates=["no", "cat", "two cats"])]
    prompts = [build_prompt(task, samples[0], [demo, demo]), build_prompt(task, samples[1], [])]
    records = rank_batch(model, processor, MediaLoader(processor), task, samples, prompts)
    for sample, prompt, record in zip(samples, prompts, records):
        ids, media = processor.encode_prompt(*prompt)
        batch = processor.batch_media([media])
        reference = {}
        for name in task.candidates_for(sample):
            cont = processor.tokenizer(task.continuation(name), add_special_tokens=False)["input_ids"]
            reference[name] = continuation_logprobs_reference(model, torch.tensor([ids]), cont, images=batch["images"],
                                                              num_media=batch["num_media"],
                                                              num_frames=batch["num_frames"])
        ranked = sorted(reference, key=lambda n: -reference[n])
        assert record["prediction"] == ranked[0]
        assert record["top5"] == ranked[:5]


def test_shards_are_strided_and_gathering_wants_each_index_exactly_once():
    n, world = 7, 3
    shards = [shard(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n)) and [len(s) for s in shards] == [3, 2, 2]
    parts = [[(i, f"p{i}") for i in s] for s in shards]
    assert gather_by_index(parts, n) == [f"p{i}" for i in range(n)]
    with pytest.raises(RuntimeError, match="twice"):
        gather_by_index(parts + [[(0, "again")]], n)
    with pytest.raises(RuntimeError, match="missing"):
        gather_by_index(parts[:2], n)


def _rank_worker(rank, world, port, model_dir, data_dir, out_dir, demos="random"):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    encoded, pooled = [0], rices.pooled_features  # (forked: the patch stays in this rank's process)

    def counting(model, media, batch_size=32):
        encoded[0] += len(media)
        return pooled(model, media, batch_size)

    rices.pooled_features = counting
    model, processor = load_pretrained(model_dir)
    try:
        results = evaluate(model, processor, "vqa", data_dir, shots=[0, 2], trials=1, batch_size=2, progress=False,
                           out_dir=out_dir, demos=demos, generation={"max_new_tokens": 3, "num_beams": 1})
        os.makedirs(out_dir, exist_ok=True)  # only rank 0 writes the results
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"runs": results["runs"], "encoded": encoded[0]}, f)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_ranks_give_the_predictions_and_metrics_of_one_process(model_and_processor, tmp_path):
    # the fixture dataset's 5 test questions -> shards of 3 and 2
    model, processor = model_and_processor
    model_dir, data = str(tmp_path / "model"), make_vqa(tmp_path / "data")
    model.save_pretrained(model_dir, processor=processor)
    # fork: the children inherit the imported modules (spawn would re-import torch + transformers twice)
    torch.multiprocessing.start_processes(_rank_worker, args=(2, _free_port(), model_dir, str(data),
                                                              str(tmp_path / "dist")), nprocs=2, start_method="fork")
    single = load_pretrained(model_dir)
    evaluate(*single, "vqa", str(data), shots=[0, 2], trials=1, batch_size=2, progress=False,
             out_dir=str(tmp_path / "one"), generation={"max_new_tokens": 3, "num_beams": 1})
    for name in ("vqa_0shot_trial0.jsonl", "vqa_2shot_trial0.jsonl"):
        dist_lines = (tmp_path / "dist" / "predictions" / name).read_text().splitlines()
        one_lines = (tmp_path / "one" / "predictions" / name).read_text().splitlines()
        assert len(dist_lines) == 5 and dist_lines == one_lines  # every sample once, same predictions
    runs0 = json.loads((tmp_path / "dist" / "rank0.json").read_text())["runs"]
    runs1 = json.loads((tmp_path / "dist" / "rank1.json").read_text())["runs"]
    one = json.loads((tmp_path / "one" / "results.json").read_text())["runs"]
    assert [r["metrics"] for r in runs0] == [r["metrics"] for r in runs1] == [r["metrics"] for r in one]


@pytest.mark.distributed
def test_two_ranks_split_the_rices_query_set_and_equal_one_process(model_and_processor, tmp_path):
    # 5 pool questions (the query set) and 5 test questions
    model, processor = model_and_processor
    model_dir, data = str(tmp_path / "model"), make_vqa(tmp_path / "data")
    model.save_pretrained(model_dir, processor=processor)
    torch.multiprocessing.start_processes(_rank_worker, args=(2, _free_port(), model_dir, str(data),
                                                              str(tmp_path / "dist"), "rices"),
                                          nprocs=2, start_method="fork")
    evaluate(*load_pretrained(model_dir), "vqa", str(data), shots=[0, 2], trials=1, batch_size=2, progress=False,
             out_dir=str(tmp_path / "one"), demos="rices", generation={"max_new_tokens": 3, "num_beams": 1})
    for name in ("vqa_0shot_trial0.jsonl", "vqa_2shot_trial0.jsonl"):
        dist_lines = (tmp_path / "dist" / "predictions" / name).read_text().splitlines()
        one_lines = (tmp_path / "one" / "predictions" / name).read_text().splitlines()
        assert dist_lines == one_lines  # same RICES demos (demo_ids are in each line), same predictions
    encoded = [json.loads((tmp_path / "dist" / f"rank{r}.json").read_text())["encoded"] for r in range(2)]
    # Each rank encodes its share of the 5 query-set images (3 + 2) and its own test images (3 + 2), once: together
    # what one process encodes (10), not the query set twice.
    assert encoded == [6, 4]


def test_queries_longer_than_max_length_are_skipped_and_counted(model_and_processor, tmp_path):
    """A query whose prompt plus longest candidate (ranked) or plus max_new_tokens (generated) needs more positions
    than the processor's max_length is not run: its record says why, the run counts it, the metric is over the rest
    and the other queries' predictions are unchanged."""
    model, processor = model_and_processor
    data = str(make_classification(tmp_path / "cls"))
    task = ClassificationTask()
    samples = task.load(data, "test")
    needed = [needed_tokens(processor, task, s, task.query_prompt(s), 0) for s in samples]
    # s10 ranks two short candidates, s11/s12 the class list (longest: two words)
    assert needed[0] < min(needed[1:]), needed
    # a candidate's last token is scored, never fed: it takes no position (a server's echo feeds it)
    from flamingo.eval.predict import continuation_ids_of

    longest = max(map(len, continuation_ids_of(processor, task, samples[0].candidates, task.query_prompt(samples[0]))))
    assert needed[0] == len(processor.prompt_ids(task.query_prompt(samples[0]))) + longest - 1
    assert needed_tokens(processor, task, samples[0], task.query_prompt(samples[0]), 0, fed_last=True) == needed[0] + 1
    full = evaluate(model, processor, "classification", data, shots=[0], trials=1, zero_shot="none",
                    progress=False, out_dir=str(tmp_path / "full"))
    short = copy.copy(processor)
    short.max_length = needed[0]  # exactly what s10 needs: kept
    cut = evaluate(model, short, "classification", data, shots=[0], trials=1, zero_shot="none", progress=False,
                   out_dir=str(tmp_path / "cut"))
    full_records = [json.loads(line) for line in
                    (tmp_path / "full" / "predictions" / "classification_0shot_trial0.jsonl").read_text().splitlines()]
    cut_records = [json.loads(line) for line in
                   (tmp_path / "cut" / "predictions" / "classification_0shot_trial0.jsonl").read_text().splitlines()]
    assert cut_records[0] == full_records[0]
    assert [r["id"] for r in cut_records] == [s.id for s in samples]
    for record, n in zip(cut_records[1:], needed[1:]):
        assert "prediction" not in record and record["skipped"] == f"needs {n} tokens, max_length is {needed[0]}"
    assert cut["runs"][0]["skipped"] == 2 and full["runs"][0]["skipped"] == 0
    assert cut["runs"][0]["metrics"] == task.compute_metrics(samples[:1], full_records[:1])
    assert "0-shot 2" in (tmp_path / "cut" / "results.md").read_text()

    # generation: prompt + max_new_tokens; every query one token too long -> no metric, the table says n/a
    vqa_dir = str(make_vqa(tmp_path / "vqa"))
    vqa = get_task("vqa")
    queries = vqa.load(vqa_dir, "test")
    short.max_length = min(needed_tokens(processor, vqa, s, vqa.query_prompt(s), 3) for s in queries) - 1
    none = evaluate(model, short, vqa, vqa_dir, shots=[0, 1], trials=1, zero_shot="none", progress=False,
                    out_dir=str(tmp_path / "none"), generation={"max_new_tokens": 3, "num_beams": 1})
    assert [r["skipped"] for r in none["runs"]] == [5, 5] and all(r["metrics"] == {} for r in none["runs"])
    table = (tmp_path / "none" / "results.md").read_text()
    assert "| vqa_accuracy | n/a | n/a |" in table  # the task's metric row, though no run computed it
    assert "0-shot 5, 1-shot 5." in table and not (tmp_path / "none" / "results.png").exists()
    assert [(r["metric"], r["shots"], r["mean"], r["skipped"]) for r in none["summary"]] == \
        [("vqa_accuracy", 0, None, [5]), ("vqa_accuracy", 1, None, [5])]


def _records(out: Path, k: int) -> list[dict]:
    lines = (out / "predictions" / f"classification_{k}shot_trial0.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("task,make,lost", [("classification", make_classification, "images/11.png"),
                                          ("videoqa", make_videoqa, "videos/v11.mp4"),
                                          ("vqa", make_vqa, "images/101.png")])
def test_a_missing_media_file_is_skipped_and_counted_not_fatal(model_and_processor, tmp_path, task, make, lost):
    """A file that is gone (real video sets nearly always lack a few) costs only the queries that need it, as an
    unreadable one does; the split still loads."""
    model, processor = model_and_processor
    data = make(tmp_path / "data")
    os.remove(data / lost)  # (VQA's 101 is found by its image_id)
    with pytest.warns(UserWarning, match=r"could not be read \(1 file\(s\)\)"):
        got = evaluate(model, processor, task, str(data), shots=[0], trials=1, zero_shot="none", progress=False,
                       generation={"max_new_tokens": 2, "num_beams": 1})
    assert got["runs"][0]["skipped_by"] == {"unreadable_media": 1}


def test_queries_with_unreadable_media_are_skipped_and_counted(model_and_processor, tmp_path):
    """A query whose own image cannot be read is not run: its record says why, the run counts it by reason, a
    warning names the file and the other queries' predictions are those of the clean data. Under RICES a demo whose
    image cannot be read is never preferred. More than half of a run's queries unreadable: the data is wrong, stop."""
    model, processor = model_and_processor
    clean = make_classification(tmp_path / "clean")
    broken = make_classification(tmp_path / "broken")
    (broken / "images" / "11.png").write_bytes(b"not a png")  # the query s11's image
    (broken / "images" / "0.png").write_bytes(b"")  # the demo s0's image

    runs = {"random": dict(shots=[0], zero_shot="none"), "rices": dict(shots=[2], zero_shot="none")}
    for demos, settings in runs.items():
        ref_dir, got_dir = tmp_path / f"ref_{demos}", tmp_path / f"got_{demos}"
        evaluate(model, processor, "classification", str(clean), trials=1, demos=demos, progress=False,
                 out_dir=str(ref_dir), **settings)
        with pytest.warns(UserWarning, match=r"could not be read \(1 file\(s\)\).*11\.png"):
            got = evaluate(model, processor, "classification", str(broken), trials=1, demos=demos, progress=False,
                           out_dir=str(got_dir), **settings)
        k = settings["shots"][0]
        assert got["runs"][0]["skipped"] == 1 and got["runs"][0]["skipped_by"] == {"unreadable_media": 1}
        same = 0
        for ref, record in zip(_records(ref_dir, k), _records(got_dir, k)):
            assert "s0" not in record["demo_ids"]  # RICES: the unreadable demo comes after every readable one
            if record["id"] == "s11":
                assert record["skip_reason"] == "unreadable_media" and "prediction" not in record
                assert "11.png" in record["skipped"]
            else:
                assert "skipped" not in record
                if record["demo_ids"] == ref["demo_ids"]:
                    assert record == ref
                    same += 1
        assert same >= 1
        assert "with an image or video that cannot be read (of 3 queries, most over trials): " \
            f"{k}-shot 1." in (got_dir / "results.md").read_text()

    (broken / "images" / "10.png").write_bytes(b"")  # 2 of the 3 queries
    with pytest.raises(ValueError, match=r"2 of 3 queries of .* have media that cannot be read .*10\.png"):
        evaluate(model, processor, "classification", str(broken), shots=[0], trials=1, zero_shot="none",
                 progress=False)


def test_the_mini_demo_evaluates_with_nothing_between_demos_as_its_documents_join_chunks(model_and_processor,
                                                                                          tmp_path, monkeypatch):
    """`flamingo demo` evaluates a model trained on documents that join chunks with nothing
    (`<|endofchunk|><image>`): its VQA and captioning prompts keep that, not OpenFlamingo's "\\n" after each demo."""
    model, processor = model_and_processor
    monkeypatch.setattr(demo_evaluate, "load_pretrained", lambda path: (model, processor))
    prompts = []
    spy = runner.build_prompt
    monkeypatch.setattr(runner, "build_prompt", lambda *a, **k: prompts.append(spy(*a, **k)[0]) or spy(*a, **k))
    tasks = [{"name": name, "harness_task": name, "data_dir": str(make(tmp_path / name)), "shots": [0, 2],
              "num_samples": 2, "out_dir": str(tmp_path / "out" / name)}
             for name, make in (("vqa", make_vqa), ("captioning", make_captioning))]
    results = demo_evaluate.run_eval_job({"name": "flamingo", "model_dir": "unused", "gates_zero": False, "seed": 0,
                                          "batch_size": 2, "tasks": tasks})
    assert all(r["settings"]["demo_separator"] == "" for r in results.values())
    assert len(prompts) == 8 and not any("\n" in p for p in prompts)
    assert all("<|endofchunk|>Question:" in p or "<|endofchunk|>Output:" in p for p in prompts[:2] + prompts[4:6])
    assert all("<|endofchunk|><image>" in p for p in prompts[2:4] + prompts[6:])  # 2 shots


def test_nearest_gives_the_same_neighbours_a_block_of_queries_at_a_time(monkeypatch):
    """A whole train split as the pool: `nearest` holds a block of query rows' similarities at a time, and the
    neighbours are those of one matmul."""
    torch.manual_seed(0)
    pool, query = _unit(torch.randn(9, 4)), _unit(torch.randn(5, 4))
    whole = nearest(query, pool, 3)
    monkeypatch.setattr(rices, "SIMILARITY_BLOCK", 20)  # 2 query rows of 9 similarities a block
    assert torch.equal(nearest(query, pool, 3), whole)
    assert nearest(query[:0], pool, 3).shape == (0, 3)


def test_rices_searches_the_whole_train_split_by_default_with_the_same_demos_every_trial():
    """OpenFlamingo and Flamingo retrieve RICES demos from the whole train split: a pool larger than random demos'
    query set (RANDOM_QUERY_SET) is searched whole by default, so a near-copy of the query that a 2048-sample query
    set leaves out is its nearest demo whatever the trial seed, and the demos are the same in every trial. A query
    set given explicitly still restricts the search; random demos keep their 2048 unless told."""
    n = RANDOM_QUERY_SET + 952
    g = torch.Generator().manual_seed(0)
    feats = _unit(torch.randn(n + 1, 16, generator=g))
    pool = _samples(n, "p")
    table = {s.media[0]: feats[i] for i, s in enumerate(pool)}
    drawn = {s.id for s in DemoSelector(pool, "random", RANDOM_QUERY_SET, seed=0).query_set}
    twin = next(i for i in range(n) if f"p{i}" not in drawn)  # left out of seed 0's random query set
    query = Sample(id="q", media=["q.png"], fields={"question": "q"}, answer="a")
    table["q.png"] = _unit(feats[twin] + 0.05 * feats[n])
    per_seed = [[d.id for d in DemoSelector(pool, "rices", seed=seed, features=PresetFeatures(table)).select(
        query, 0, 4)] for seed in range(3)]
    assert per_seed[0][-1] == f"p{twin}" and per_seed == [per_seed[0]] * 3  # most similar last, every trial
    assert len(DemoSelector(pool, "rices", features=PresetFeatures(table)).query_set) == n
    given = DemoSelector(pool, "rices", RANDOM_QUERY_SET, seed=0, features=PresetFeatures(table))
    assert len(given.query_set) == RANDOM_QUERY_SET and f"p{twin}" not in [d.id for d in given.select(query, 0, 4)]
    assert len(DemoSelector(pool, "random", seed=0).query_set) == RANDOM_QUERY_SET
    assert len(DemoSelector(pool, "random", "all", seed=0).query_set) == n
    for bad in (0, -3, "some", 2.5, True):
        with pytest.raises(ValueError, match="query_set must be >= 1, 'all'"):
            DemoSelector(pool, "random", bad)


def test_evaluate_records_the_query_set_it_used_and_rices_demos_repeat_across_trials(model_and_processor, tmp_path,
                                                                                      monkeypatch):
    """`settings.query_set` is the number of train samples demos came from: by default RICES's whole split and
    random demos' RANDOM_QUERY_SET (3 here, fewer than the fixture's 5 train questions), or what was asked."""
    model, processor = model_and_processor
    monkeypatch.setattr("flamingo.eval.demos.RANDOM_QUERY_SET", 3)
    data = make_vqa(tmp_path / "data")
    quick = dict(shots=[2], trials=2, num_samples=3, progress=False, generation={"max_new_tokens": 1, "num_beams": 1})
    for demos, query_set, used in (("rices", None, 5), ("random", None, 3), ("random", "all", 5), ("rices", 2, 2)):
        out = tmp_path / f"{demos}{query_set}"
        results = evaluate(model, processor, "vqa", str(data), demos=demos, query_set=query_set, out_dir=str(out),
                           **quick)
        assert results["settings"]["query_set"] == used
        if demos == "rices" and query_set is None:
            trials = [[json.loads(line)["demo_ids"] for line in (out / "predictions" / f"vqa_2shot_trial{t}.jsonl")
                       .open()] for t in range(2)]
            assert trials[0] == trials[1]


def test_feature_cache_encodes_a_batch_at_a_time_once_with_a_progress_bar(model_and_processor, tmp_path, monkeypatch,
                                                                          capsys):
    """A whole train split's features: `batch_size` media decoded and encoded at a time (never every image's pixels
    at once), each file once (samples showing one image share it), with a progress bar for more than one batch; an
    unreadable file gets a zero row."""
    model, processor = model_and_processor
    paths = []
    for i in range(5):
        random_image(i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    paths.insert(2, str(tmp_path / "missing.png"))
    sizes, pooled = [], rices.pooled_features
    monkeypatch.setattr(rices, "pooled_features",
                        lambda model, media, batch_size=32: sizes.append(len(media)) or pooled(model, media,
                                                                                               batch_size))
    cache = FeatureCache(model, MediaLoader(processor), batch_size=2, progress=True)
    got = cache.get(paths + paths[:1])[:-1]  # the first image twice (two questions on one image)
    assert sizes == [2, 1, 2]  # batches of 2 files, the missing one not encoded, the repeated one once
    assert "RICES features" in capsys.readouterr().err
    readable = [p for p in paths if "missing" not in p]
    expected = pooled(model, [processor.preprocess_media(p) for p in readable])
    assert torch.allclose(got[[0, 1, 3, 4, 5]], expected, atol=1e-5) and not got[2].any()
    # each feature its own storage: pickled (all-gathered under torchrun) without the rest of its batch
    assert all(f.untyped_storage().nbytes() == f.numel() * f.element_size() for f in cache.features.values()
               if f is not None)
    assert torch.equal(cache.get(paths[::-1] + paths[:1]), torch.cat([got.flip(0), got[:1]])) and len(sizes) == 3


def test_rices_zero_shot_text_demos_are_found_for_the_shard_at_once(model_and_processor, tmp_path, monkeypatch):
    """0-shot RICES still retrieves (the zero-shot text demos are the query's nearest, as OpenFlamingo's), but for the
    whole shard at once as at k shots: the queries' features in one tower batch, not one query at a time. Demos and
    predictions at 0 and 2 shots are those of each query's demos chosen alone (`prompt_demos`)."""
    model, processor = model_and_processor
    task = get_task("vqa")
    data = make_vqa(tmp_path / "data")
    pool, samples = task.load(str(data), "train"), task.load(str(data), "test")
    loader = MediaLoader(processor)
    generation = {"max_new_tokens": 3, "num_beams": 1}

    def alone(k):  # each query's demos chosen by itself, the prompts in one batch as `predict` runs them
        selector = DemoSelector(pool, "rices", features=FeatureCache(model, loader))
        chosen = [prompt_demos(selector, s, i, k, "text") for i, s in enumerate(samples)]
        prompts = [build_prompt(task, s, demos, media) for s, (demos, media) in zip(samples, chosen)]
        records = generate_batch(model, processor, loader, task, prompts, **generation)
        return [{"id": s.id, **r, "demo_ids": [d.id for d in demos]} for s, r, (demos, _) in
                zip(samples, records, chosen)]

    expected = {k: alone(k) for k in (0, 2)}
    assert all(len(r["demo_ids"]) == 2 for k in (0, 2) for r in expected[k])
    selector = DemoSelector(pool, "rices", features=FeatureCache(model, loader))
    selector.prepare(shared=False)  # the query set's features, as `evaluate` computes them first
    sizes, pooled = [], rices.pooled_features
    monkeypatch.setattr(rices, "pooled_features",
                        lambda model, media, batch_size=32: sizes.append(len(media)) or pooled(model, media,
                                                                                               batch_size))
    for k in (0, 2):
        assert runner.predict(model, processor, task, samples, selector, k, batch_size=5, loader=loader,
                              progress=False, generation=generation) == expected[k]
        assert sizes == [5]  # the 5 queries' features in one batch at 0 shots; 2 shots reuses them
    runner.predict(model, processor, task, samples, selector, 0, zero_shot="none", batch_size=5, loader=loader,
                   progress=False, generation=generation)
    assert sizes == [5]  # zero-shot "none": no demo, nothing retrieved


def test_trials_whose_prompts_do_not_depend_on_the_seed_are_predicted_once(model_and_processor, tmp_path,
                                                                           monkeypatch):
    """RICES over the whole train split (the same demos every trial) and 0 shots without demos give every trial the
    prompts of trial 0: its predictions are reused (`repeats_trial` in the run), not recomputed. Random demos, and
    RICES over a query set drawn per trial, are predicted per trial."""
    model, processor = model_and_processor
    data = make_vqa(tmp_path / "data")
    calls, predict = [], runner.predict
    monkeypatch.setattr(runner, "predict", lambda *a, **k: calls.append((a[5], k["description"])) or predict(*a, **k))
    quick = dict(trials=3, num_samples=3, progress=False, generation={"max_new_tokens": 2, "num_beams": 1})
    cases = (("rices", None, "text", [0, 2], 2), ("rices", 2, "text", [2], 3), ("random", "all", "text", [2], 3),
             ("random", "all", "none", [0], 1))
    for demos, query_set, zero_shot, shots, predicted in cases:
        calls.clear()
        out = tmp_path / f"{demos}{query_set}{zero_shot}"
        results = evaluate(model, processor, "vqa", str(data), demos=demos, query_set=query_set, shots=shots,
                           zero_shot=zero_shot, out_dir=str(out), **quick)
        assert len(calls) == predicted, (demos, query_set, calls)
        repeated = [r for r in results["runs"] if "repeats_trial" in r]
        assert len(repeated) == 3 * len(shots) - predicted
        for run in repeated:
            first = next(r for r in results["runs"] if r["shots"] == run["shots"] and r["trial"] == 0)
            assert run["metrics"] == first["metrics"] and run["repeats_trial"] == 0 and run["seed"] == run["trial"]
            files = [(out / "predictions" / f"vqa_{run['shots']}shot_trial{t}.jsonl").read_text()
                     for t in (0, run["trial"])]
            assert files[0] == files[1]
    # recomputing agrees: RICES trial 1 predicted anew equals the reused one
    calls.clear()
    monkeypatch.setattr(runner, "seeded_prompts", lambda *a: True)
    again = evaluate(model, processor, "vqa", str(data), demos="rices", shots=[2], out_dir=str(tmp_path / "again"),
                     **quick)
    assert len(calls) == 3 and len({json.dumps(r["metrics"]) for r in again["runs"]}) == 1
    assert (tmp_path / "again" / "predictions" / "vqa_2shot_trial2.jsonl").read_text() == \
        (tmp_path / "ricesNonetext" / "predictions" / "vqa_2shot_trial2.jsonl").read_text()
