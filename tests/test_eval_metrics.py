"""Evaluation metrics on hand-computed cases: official VQA accuracy, CIDEr = pycocoevalcap's, ROC-AUC, top-k."""

import pytest

from flamingo.eval.cider import cider, java_available, python_tokenize, tokenize
from flamingo.eval.classification import topk_accuracy
from flamingo.eval.hateful_memes import roc_auc
from flamingo.eval.runner import summarize
from flamingo.eval.task import Sample
from flamingo.eval.vqa import VQATask
from flamingo.eval.vqa_metric import normalize_answer, postprocess_vqa_generation, vqa_accuracy


@pytest.mark.parametrize("raw, normal", [
    ("Two", "2"), ("the dog.", "dog"), ("dont", "don't"), ("A Cat", "cat"), ("yes!", "yes"), ("ten", "10"),
    ("black/white", "black white"), ("1,000", "1000"), ("3.5", "3.5"), ("  Red  ", "red"), ("isnt it", "isn't it"),
])
def test_vqa_normalisation_matches_the_official_script(raw, normal):
    assert normalize_answer(raw) == normal


def test_vqa_accuracy_averages_min_matches_over_3_over_leave_one_out_subsets():
    others = ["x"] * 10
    # m humans of 10 gave the answer: each leave-one-out subset of 9 scores min(matches/3, 1).
    # m=1: 9 subsets keep it (1/3), 1 drops it (0) -> 9 * (1/3) / 10 = 0.3
    assert vqa_accuracy("cat", ["cat"] + others[:9]) == pytest.approx(0.3)
    # m=2: 8 subsets with 2 (2/3), 2 with 1 (1/3) -> (16/3 + 2/3) / 10 = 0.6
    assert vqa_accuracy("cat", ["cat"] * 2 + others[:8]) == pytest.approx(0.6)
    # m=3: 7 subsets with 3 (1), 3 with 2 (2/3) -> (7 + 2) / 10 = 0.9
    assert vqa_accuracy("cat", ["cat"] * 3 + others[:7]) == pytest.approx(0.9)
    assert vqa_accuracy("cat", ["cat"] * 4 + others[:6]) == pytest.approx(1.0)  # >= 4: every subset has 3
    assert vqa_accuracy("dog", ["cat"] * 10) == 0.0
    # normalisation on both sides: "Two" vs three humans writing "2" (one "two", two "2") -> 0.9
    assert vqa_accuracy("Two", ["2", "two", "2"] + others[:7]) == pytest.approx(0.9)
    assert vqa_accuracy("the dog.", ["dog"] * 10) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("a", [])


def test_vqa_accuracy_is_broken_down_per_answer_type_and_averaged_over_trials_that_have_it():
    def sample(i, kind, answer):
        return Sample(id=str(i), media=[], fields={"question": "q"}, answer=answer, references=[answer] * 10, kind=kind)

    samples = [sample(0, "yes/no", "yes"), sample(1, "yes/no", "no"), sample(2, "number", "2"), sample(3, None, "x")]
    predictions = [{"prediction": p} for p in ("yes", "yes", "2", "y")]
    metrics = VQATask().compute_metrics(samples, predictions)
    assert metrics == {"vqa_accuracy": 50.0, "vqa_accuracy/number": 100.0, "vqa_accuracy/yes/no": 50.0}
    # A trial whose samples lack a type: that part is None in its values, the mean is over the trials that have it.
    runs = [{"task": "vqa", "model": "m", "shots": 0, "seed": s, "num_samples": 4, "date": "d", "metrics": m}
            for s, m in enumerate([metrics, {"vqa_accuracy": 25.0, "vqa_accuracy/yes/no": 0.0}])]
    rows = {r["metric"]: r for r in summarize(runs)}
    assert rows["vqa_accuracy/number"]["values"] == [100.0, None] and rows["vqa_accuracy/number"]["mean"] == 100.0
    assert rows["vqa_accuracy/yes/no"]["mean"] == 25.0 and rows["vqa_accuracy"]["mean"] == 37.5


def test_vqa_postprocess_cuts_at_a_newline_or_the_next_prompt_word_and_lowercases():
    assert postprocess_vqa_generation(" Red\nQuestion: what") == "red"
    assert postprocess_vqa_generation("yes Question: is it") == "yes"
    assert postprocess_vqa_generation("Two dogs Short answer:") == "two dogs"


CAPTIONS = {
    "a": ["A dog runs on the grass.", "a brown dog running in a field", "The dog's ball is red!"],
    "b": ["Two cats don't sleep on a black-and-white sofa.", "cats on a couch", "two cats (maybe three) on a sofa"],
    "c": ["A man riding a wave on top of a surfboard.", "a surfer rides a big wave", "man surfing"],
}
PREDICTIONS = {"a": "a dog running on grass", "b": "two cats on a sofa.", "c": "A man surfing a wave"}


def test_cider_equals_pycocoevalcap_python_tokenizer():
    from pycocoevalcap.cider.cider import Cider

    score, used = cider(PREDICTIONS, CAPTIONS, tokenizer="python")
    assert used == "python"
    gts = {k: [python_tokenize(c) for c in v] for k, v in CAPTIONS.items()}
    res = {k: [python_tokenize(PREDICTIONS[k])] for k in CAPTIONS}
    expected, _ = Cider().compute_score(gts, res)
    assert score == pytest.approx(expected)
    assert score > 0


@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs java")
def test_cider_equals_pycocoevalcap_ptb_and_python_tokens_match_ptb():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    score, used = cider(PREDICTIONS, CAPTIONS, tokenizer="ptb")
    assert used == "ptb"
    # pycocoevalcap's own pipeline (what OpenFlamingo's coco_metric does): one PTB call per side.
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in CAPTIONS.items()})
    res = tok.tokenize({k: [{"caption": PREDICTIONS[k]}] for k in CAPTIONS})
    expected, _ = Cider().compute_score(gts, res)
    assert score == pytest.approx(expected)
    # The Python fallback tokenizes these captions exactly as PTB does, so CIDEr agrees too.
    assert {k: [python_tokenize(c) for c in v] for k, v in CAPTIONS.items()} == gts
    assert cider(PREDICTIONS, CAPTIONS, tokenizer="python")[0] == pytest.approx(score)


def test_python_tokenize_splits_clitics_keeps_numbers_and_names_brackets_as_ptb():
    assert python_tokenize("The dog's ball, red.") == "the dog 's ball red"
    assert python_tokenize("Cats don't sleep!") == "cats do n't sleep"
    assert python_tokenize("a black-and-white photo of 1,000 (or 3.5) birds") == \
        "a black-and-white photo of 1,000 -lrb- or 3.5 -rrb- birds"
    assert tokenize({"x": ["A B"]}, "python") == ({"x": ["a b"]}, "python")
    with pytest.raises(ValueError):
        tokenize({"x": ["a"]}, "nltk")


# PTBTokenizer's own output (pycocoevalcap's stanford-corenlp-3.4.1.jar, `-lowerCase`, punctuation removed as
# pycocoevalcap removes it), written down so the Python tokenization is checked without Java
PTB_TOKENS = [
    ("The clock on the tower reads 10:30.", "the clock on the tower reads 10:30"),
    ("It is 10:30pm", "it is 10:30 pm"),
    ("a 16:9 screen", "a 16:9 screen"),
    ("the car is at 5 o'clock", "the car is at 5 o'clock"),
    ("O'Neill's pub", "o'neill 's pub"),
    ("a cat/dog on a black-and-white/red mat", "a cat/dog on a black-and-white/red mat"),
    ("1/2 a pizza, open 24/7", "1/2 a pizza open 24/7"),
    ("a 3-1/2 inch disk", "a 3-1/2 inch disk"),
    ("a 3 1/2 inch disk", "a 3\xa01/2 inch disk"),
    ("I cannot see it", "i can not see it"),
    ("He's gonna win", "he 's gon na win"),
    ("wanna go? gotta go", "wan na go got ta go"),
    ("lemme see, gimme that", "lem me see gim me that"),
    ("'Tis the season", "'t is the season"),
    ("Mr. Smith and Mrs. Jones", "mr. smith and mrs. jones"),
    ("St. Mark's square", "st. mark 's square"),
    ("Dr. Who, Jr. and Co.", "dr. who jr. and co."),
    ("a sign for Main St. and 1st Ave.", "a sign for main st. and 1st ave."),
    ("a No. 5 jersey", "a no. 5 jersey"),
    ("a sign that says no.", "a sign that says no"),
    ("the U.S. flag at 10 a.m.", "the u.s. flag at 10 a.m."),
    ("a dog, e.g. a puppy", "a dog e.g. a puppy"),
    ("vitamin C. The end", "vitamin c the end"),
    ("vitamin C.", "vitamin c."),
    ("rock 'n' roll", "rock 'n' roll"),
    ("rock 'n roll", "rock 'n roll"),
    ("fish 'n' chips", "fish 'n' chips"),
    ("the '90s", "the '90s"),
    ("y'all", "y' all"),
    ("s'mores", "s'mores"),
    ("a -5 degree day", "a -5 degree day"),
    (".5 inch", ".5 inch"),
    ("a 3.5-inch disk", "a 3.5-inch disk"),
    ("AT&T store", "at&t store"),
    ("wow!! what?!", "wow !! what ?!"),
    ("#1 fan", "# 1 fan"),
    ("##", "##"),
    ("it\u2019s a dog\u2019s \u201ctoy\u201d", "it 's a dog 's toy"),
    ("a dog\u2014a cat", "a dog a cat"),
    ("two cats\u2026 sleeping", "two cats sleeping"),
    ("Ill. state", "ill. state"),
    ("ill man", "ill man"),
    ("a dog.a cat", "a dog.a cat"),
    ("don't, can't, won't", "do n't ca n't wo n't"),
]


@pytest.mark.parametrize("caption, ptb", PTB_TOKENS)
def test_python_tokenize_writes_ptbs_tokens_for_clocks_slashes_contractions_and_abbreviations(caption, ptb):
    assert python_tokenize(caption) == ptb


@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs java")
def test_the_pinned_ptb_tokens_are_what_ptb_writes():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, (c, _) in enumerate(PTB_TOKENS)})
    assert [out[i][0] for i in range(len(PTB_TOKENS))] == [ptb for _, ptb in PTB_TOKENS]


def test_cider_refuses_mismatched_keys_and_samples_without_references():
    with pytest.raises(ValueError):
        cider({"a": "x"}, {"b": ["x"]}, tokenizer="python")
    with pytest.raises(ValueError):
        cider({"a": "x"}, {"a": []}, tokenizer="python")


def test_roc_auc_is_the_fraction_of_ordered_pairs_and_none_for_one_class():
    # 3 positives, 2 negatives: pairs (pos, neg) ranked right: (0.9>0.1, 0.9>0.6, 0.4>0.1, 0.4<0.6, 0.8>0.1,
    # 0.8>0.6) -> 5 of 6.
    assert roc_auc([1, 0, 1, 0, 1], [0.9, 0.1, 0.4, 0.6, 0.8]) == pytest.approx(5 / 6)
    assert roc_auc([1, 0], [0.2, 0.7]) == 0.0
    assert roc_auc([1, 1], [0.2, 0.7]) is None  # undefined with one class


def test_topk_accuracy_counts_labels_within_the_first_k_names():
    labels = ["cat", "dog", "bird"]
    ranked = [["cat", "dog"], ["cat", "bird", "x", "y", "z", "dog"], ["a", "b", "c", "d", "bird"]]
    assert topk_accuracy(labels, ranked, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(labels, ranked, 5) == pytest.approx(2 / 3)  # dog is 6th
    assert topk_accuracy(labels, ranked, 6) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        topk_accuracy(labels, ranked[:2], 1)
