"""Evaluation metrics on hand-computed cases: official VQA accuracy, CIDEr = pycocoevalcap's, ROC-AUC, top-k."""

import pytest

from flamingo.eval.captioning import CaptioningTask
from flamingo.eval.cider import cider, java_available, python_tokenize, tokenize
from flamingo.eval.classification import topk_accuracy
from flamingo.eval.hateful_memes import HatefulMemesTask, roc_auc
from flamingo.eval.runner import markdown_table, summarize
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


def test_vqa_accuracy_with_fewer_than_10_answers_is_min_1_matches_over_min_3_n_without_leave_one_out():
    """The leave-one-out average assumes 10 answers: against one human it would score every prediction 0."""
    assert vqa_accuracy("red", ["red"]) == 1.0  # one answer: an exact match after normalisation
    assert vqa_accuracy("Red.", ["red"]) == 1.0 and vqa_accuracy("blue", ["red"]) == 0.0
    assert vqa_accuracy("red", ["red", "red"]) == 1.0 and vqa_accuracy("red", ["red", "blue"]) == 0.5
    assert vqa_accuracy("red", ["red"] * 3) == 1.0 and vqa_accuracy("red", ["red", "x", "x"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("red", ["red"] * 2 + ["x"] * 7) == pytest.approx(2 / 3)  # 9 answers: min(1, m / 3)
    assert vqa_accuracy("red", ["red"] * 2 + ["x"] * 8) == pytest.approx(0.6)  # 10: leave-one-out, as before


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
    # the table marks a cell of fewer trials than its header's
    table = markdown_table({"task": "vqa", "model": "m", "num_samples": 4, "date": "d", "runs": runs,
                            "summary": summarize(runs), "settings": {"trials": 2, "seed": 0, "demos": "random",
                                                                     "zero_shot": "text"}})
    assert "| vqa_accuracy/number | 100.00 ± 0.00 (1 of 2 trials) |" in table
    assert "| vqa_accuracy | 37.50 ± 12.50 |" in table


def test_vqa_postprocess_cuts_at_a_newline_or_the_next_prompt_word_and_lowercases():
    assert postprocess_vqa_generation(" Red\nQuestion: what") == "red"
    assert postprocess_vqa_generation("yes Question: is it") == "yes"
    assert postprocess_vqa_generation("Two dogs Short answer:") == "two dogs"
    # OpenFlamingo's ", " cut: the answer before a comma the model goes on after
    assert postprocess_vqa_generation(" yes, it is") == "yes"
    assert postprocess_vqa_generation(" red, white and") == "red"
    assert postprocess_vqa_generation("1,000") == "1,000"  # a comma without a space stays
    # any line break (str.splitlines'), not only "\n"
    assert postprocess_vqa_generation(" red\rblue") == "red" and postprocess_vqa_generation("red\u2028x") == "red"


def test_generated_text_is_cut_at_any_line_break():
    """A "\\r" (or U+2028, VT, FF) the model writes ends the prediction as "\\n" does."""
    assert CaptioningTask().postprocess("a\rb") == "a"
    assert CaptioningTask().postprocess(" a dog\u2028running\nOutput:") == "a dog"
    assert CaptioningTask().postprocess(" a dog Output: a cat") == "a dog"
    assert CaptioningTask().postprocess("") == "" and CaptioningTask().postprocess(" \r\n") == ""
    assert HatefulMemesTask().postprocess("yes\x0bno") == "yes"  # the base Task's rule


@pytest.mark.parametrize("lead", ["\n", " \n", "\r\n", "\n\n", "\u2028 ", "\x0c\n  "])
def test_an_answer_after_leading_line_breaks_is_the_answer(lead):
    """Leading whitespace and line breaks are stripped before the cut, as OpenFlamingo scores "\\nyes" ("yes"): a
    model that opens with a line break is not scored as answering nothing."""
    assert postprocess_vqa_generation(lead + "Yes, it is\nno") == "yes"
    assert vqa_accuracy(VQATask().prediction(lead + "yes"), ["yes"] * 10) == 1.0
    assert CaptioningTask().postprocess(lead + "a dog on the beach\nOutput: a cat") == "a dog on the beach"
    assert HatefulMemesTask().postprocess(lead + "yes\nno") == "yes"  # the base Task's `first_line`


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


@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs java")
def test_a_line_break_inside_a_caption_shifts_no_other_caption_under_ptb():
    """PTB reads all captions as one text, line by line: a "\\r" (VT, FF, U+2028, a CRLF) inside one caption would
    pair every later caption with another image's tokens; each caption is one line before PTB sees it."""
    references = {"a": ["a dog running on grass\r\n", "a brown dog runs"], "b": ["a cat sleeping on a bed", "a cat"],
                  "c": ["two birds on a wire", "birds sitting on a wire"]}
    predictions = {"a": "a dog\rrunning on grass", "b": "a cat\u2028sleeping on a bed", "c": "two birds\x0con a wire"}
    ptb, used = cider(predictions, references, "ptb")
    assert used == "ptb" and ptb == pytest.approx(cider(predictions, references, "python")[0])
    tokens, _ = tokenize({"p0": ["a dog\rrunning"], "p1": ["a cat\x0bsleeping"], "p2": ["two birds"]}, "ptb")
    assert tokens == {"p0": ["a dog running"], "p1": ["a cat sleeping"], "p2": ["two birds"]}


def test_a_ptb_answer_with_a_caption_missing_is_an_error_naming_the_key(monkeypatch):
    """Were PTB's lines ever misaligned again, CIDEr must not pair captions with other images' tokens silently."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def last_lost(self, captions):  # a caption broken in two lines lost the last one (pycocoevalcap zips the lines)
        out = {k: [c["caption"] for c in v] for k, v in captions.items()}
        out["p1"].pop()
        return out

    monkeypatch.setattr(PTBTokenizer, "tokenize", last_lost)
    with pytest.raises(RuntimeError, match="returned 0 caption.*'p1', which has 1"):
        tokenize({"p0": ["a dog"], "p1": ["a cat"]}, "ptb")


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
    # what PTB drops as untokenizable, leaving a token break
    ("a dog \ufffd", "a dog"),
    ("a dog\ufffds", "a dog s"),
    ("don\ufffdt", "don t"),
    ("a cat \U0001F600 smiling", "a cat smiling"),
    ("a \U0001F1FA\U0001F1F8 flag", "a flag"),
    ("a \u2764\ufe0f heart", "a \u2764 heart"),
    ("\ufeffa dog\u200bs", "a dog s"),
    ("foot\xadball", "football"),
]


@pytest.mark.parametrize("caption, ptb", PTB_TOKENS)
def test_python_tokenize_writes_ptbs_tokens_for_clocks_slashes_contractions_and_abbreviations(caption, ptb):
    assert python_tokenize(caption) == ptb


@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs java")
def test_the_pinned_ptb_tokens_are_what_ptb_writes():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, (c, _) in enumerate(PTB_TOKENS)})
    assert [out[i][0] for i in range(len(PTB_TOKENS))] == [ptb for _, ptb in PTB_TOKENS]


# unusual captions on which the Python tokenization writes PTB's tokens (symbols, emoji, U+FFFD, accents, scripts)
EDGE_CAPTIONS = [
    "a caf\u00e9 with na\u00efve art", "a dog \ufffd", "a cat \U0001F600 smiling", "50% off at the store", "a $5 bill",
    "e.g. a dog", "i.e. the cat", "a man w/ a hat", "rock 'n' roll band", "a t-shirt and x-ray", "the 2nd floor",
    "a 3x3 grid", "salt & pepper", "AT&T store", "a dog's bone", "kids' toys", "a 10 ft. pole", "the u.s. flag",
    "a man , standing", "it is 5 p.m.", "A man.A woman", "two dogs;one cat", "a stop sign...",
    "a sign that says \"stop\"", "the \u201cbig\u201d dog", "a dog -- running", "a man's 'hat'", "a 4x4 truck",
    "a cat sitting on a table\u2026", "stra\u00dfe sign", "the ki\u00f1o's toy", "ol' man river", "a #1 sign",
    "a @ sign", "a ~ sign", "a dog=cat", "a<b", "100+ people", "a sign: no parking", "\u4e2d\u6587 text",
    "a m\u00fcnchen street", "a clock at 10:30", "a 1,000 piece puzzle", "man in a red/white shirt", "'tis the season",
    "a \u2764\ufe0f\U0001F436 dog", "two \U0001F468\u200d\U0001F469\u200d\U0001F467 people",
]


@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs java")
def test_python_tokenize_equals_ptb_on_unusual_captions():
    ptb, _ = tokenize({str(i): [c] for i, c in enumerate(EDGE_CAPTIONS)}, "ptb")
    assert [ptb[str(i)][0] for i in range(len(EDGE_CAPTIONS))] == [python_tokenize(c) for c in EDGE_CAPTIONS]


@pytest.mark.parametrize("tokenizer", ["python", pytest.param("ptb", marks=pytest.mark.skipif(
    not java_available(), reason="the PTB tokenizer needs java"))])
def test_half_a_surrogate_pair_is_read_as_ufffd_by_both_tokenizers(tokenizer):
    """A reference with an emoji a scraper cut ("\\ud83d", valid JSON): UTF-8 cannot encode it for PTB, and as a
    token it would be a word no prediction matches; both tokenizers read it as U+FFFD, which PTB drops."""
    references = {"a": ["a dog on a beach \ud83d", "a dog\udc00s ball"], "b": ["a cat"]}
    predictions = {"a": "a dog on a beach", "b": "a cat"}
    replaced = {"a": ["a dog on a beach \ufffd", "a dog\ufffds ball"], "b": ["a cat"]}
    tokens, used = tokenize(references, tokenizer)
    assert used == tokenizer and tokens == tokenize(replaced, tokenizer)[0]
    assert tokens["a"] == ["a dog on a beach", "a dog s ball"] and python_tokenize("x\ud83d") == "x"
    assert cider(predictions, references, tokenizer) == cider(predictions, replaced, tokenizer)


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


def test_hateful_memes_auc_ranks_by_log_odds_which_do_not_saturate():
    """P(yes) is exactly 1.0 in float64 once log P(yes) - log P(no) > ~37: two such memes would tie at 1.0."""
    task = HatefulMemesTask()
    samples = [Sample(id=str(i), media=[], fields={}, answer="", label=label) for i, label in enumerate([0, 1, 0, 1])]
    scores = [(-1.0, -45.0), (-1.0, -60.0), (-3.0, -1.0), (-2.0, -1.0)]  # (yes, no): log-odds 44, 59, -2, -1
    records = [task.from_scores(s, ["yes", "no"], list(sc)) for s, sc in zip(samples, scores)]
    assert [r["prob_yes"] for r in records[:2]] == [1.0, 1.0] and [r["log_odds"] for r in records] == [44, 59, -2, -1]
    assert task.compute_metrics(samples, records) == {"roc_auc": 75.0, "accuracy": 50.0}


def test_topk_accuracy_counts_labels_within_the_first_k_names():
    labels = ["cat", "dog", "bird"]
    ranked = [["cat", "dog"], ["cat", "bird", "x", "y", "z", "dog"], ["a", "b", "c", "d", "bird"]]
    assert topk_accuracy(labels, ranked, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(labels, ranked, 5) == pytest.approx(2 / 3)  # dog is 6th
    assert topk_accuracy(labels, ranked, 6) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        topk_accuracy(labels, ranked[:2], 1)
