"""The official VQA accuracy (VQAv2 eval script, github.com/GT-Vision-Lab/VQA, BSD licence), as a pure function.

Answers are normalised as the official script does: punctuation (`process_punctuation`), then lower case, number
words -> digits, articles dropped, missing apostrophes restored in contractions (`process_digit_article`). A prediction
scores `min(#humans who gave it / 3, 1)`, averaged over the 10 leave-one-out subsets of the 10 human answers.

The official formula assumes VQAv2's 10 answers per question. With fewer n < 10 (a custom set, or an annotation
giving only `multiple_choice_answer`) a prediction scores `min(1, matches / min(3, n))`, without leave-one-out: one
answer is an exact match after normalisation, two score 1.0 when both agree (0.5 for one of them), three to nine
score as min(1, matches / 3). (Leave-one-out would score a perfect answer 0 against one human, 0.67 against three.)

One deliberate difference: the official script normalises only when the humans disagree (an efficiency shortcut
that, with an unnormalised prediction, can score "Two" as 0 when all ten humans wrote "2"); we always normalise both
sides. Its `periodStrip.sub(..., re.UNICODE)` passes the flag as a `count` (32): we strip every period, which agrees
for any answer with fewer than 33 periods.
"""

from __future__ import annotations

import re
from typing import Sequence

CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've",
    'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's",
    'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've",
    'shouldnt': "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
    'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    'theyll': "they'll", 'theyre': "they're", 'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't", 'whatll': "what'll",
    'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's", 'whered': "where'd",
    'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's",
    'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not followed by a digit ("(?!<=" is the original's typo)
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")  # a thousands separator: "1,000"
LINE_BREAK = "[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]"  # what `str.splitlines` breaks at


def process_punctuation(text: str) -> str:
    """Drop punctuation glued to a word ("dog." -> "dog"), turn other punctuation into spaces ("black/white")."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """Lower case, number words -> digits, no articles, contractions with their apostrophe ("dont" -> "don't")."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official normalisation of one answer (prediction or human)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy of one prediction: mean over leave-one-out subsets of min(#matches / 3, 1).

    With 10 humans of whom m gave the prediction: m = 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1. With n < 10
    humans: min(1, m / min(3, n)), no leave-one-out (1 human: exact match; see the module docstring).
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in human_answers]
    total = sum(matches)
    if len(matches) < 10:
        return min(1.0, total / min(3, len(matches)))
    # Leaving out answer i removes one match iff answer i matched.
    scores = [min((total - int(m)) / 3.0, 1.0) for m in matches]
    return sum(scores) / len(scores)


def postprocess_vqa_generation(text: str) -> str:
    """A generated short answer -> the answer: cut at the next "Question"/"Answer"/"Short" the model starts to write
    or at ", " ("yes, it is" -> "yes"), as OpenFlamingo's rule does, and at any line break after the answer's start
    (leading whitespace and line breaks are stripped first: "\\nyes" is "yes", as OpenFlamingo scores it); strip,
    lower case."""
    text = re.split(f"{LINE_BREAK}|, |Question|Answer|Short", text.lstrip(), maxsplit=1)[0]
    return text.strip().lower()
