"""CIDEr (Vedantam et al. 2015) through pycocoevalcap, with its PTB tokenizer when Java exists.

pycocoevalcap tokenizes references and candidates with Stanford CoreNLP's PTBTokenizer (`java -cp
stanford-corenlp-3.4.1.jar ... -lowerCase`) and drops punctuation tokens, then computes CIDEr-D over the evaluated
set (the IDF comes from the set's references, so the metric is computed once, on all samples gathered).

Without `java` on PATH we use `python_tokenize`, a documented approximation of that pipeline:
- lower case;
- the PTB clitic split: "n't" and 's 're 've 'll 'd 'm become their own tokens ("don't" -> "do n't", "dog's" ->
  "dog 's");
- words are runs of letters/digits, hyphenated words stay one token ("black-and-white"), numbers keep inner
  periods/commas ("3.5", "1,000");
- every other non-space character is its own token, brackets written as PTB names them ("(" -> "-lrb-": lower-cased
  by `-lowerCase`, so pycocoevalcap keeps them), double quotes dropped (PTB turns them into `` and '', which
  pycocoevalcap removes); then the punctuation tokens pycocoevalcap removes are removed.
It matches PTB on ordinary captions (tests check this when Java is there); rare constructs (URLs, abbreviations such
as "u.s.", ellipses inside words) may differ. The results record which tokenizer ran: `"tokenizer": "ptb"|"python"`.
"""

from __future__ import annotations

import re
import shutil
import warnings
from typing import Mapping, Sequence

TOKENIZERS = ("auto", "ptb", "python")  # "auto": PTB when `java` is on PATH
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                             "--", "...", ";"])  # pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS
_WORD = r"[^\W_]+(?:-[^\W_]+)*"
_TOKEN = re.compile(
    r"n't\b"  # clitic negation (after the stem below stopped before it)
    r"|'(?:s|re|ve|ll|d|m)\b"  # other clitics
    r"|\d+(?:[.,]\d+)+"  # numbers with inner separators
    rf"|{_WORD}(?=n't\b)"  # a stem followed by n't: "do|n't", "ca|n't"
    rf"|{_WORD}"
    r"|\S")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}


def java_available() -> bool:
    return shutil.which("java") is not None


def python_tokenize(text: str) -> str:
    """One caption -> space-joined lower-case tokens without punctuation (see the module docstring)."""
    tokens = [_BRACKETS.get(t, t) for t in _TOKEN.findall(text.replace("\n", " ").lower())]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def tokenize(captions: Mapping[str, Sequence[str]], tokenizer: str = "auto") -> tuple[dict[str, list[str]], str]:
    """{key: [captions]} -> ({key: [tokenized captions]}, the tokenizer used: "ptb" or "python").

    tokenizer: "auto" (PTB when `java` is on PATH), "ptb" or "python".
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "ptb" or (tokenizer == "auto" and java_available()):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        try:
            out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
            return {k: out.get(k, [""] * len(v)) for k, v in captions.items()}, "ptb"
        except Exception as e:  # Java present but unusable (e.g. a read-only site-packages for its temp file)
            if tokenizer == "ptb":
                raise
            warnings.warn(f"PTB tokenizer failed ({e}); using the Python tokenization", stacklevel=2)
    return {k: [python_tokenize(c) for c in v] for k, v in captions.items()}, "python"


def cider(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
          tokenizer: str = "auto") -> tuple[float, str]:
    """CIDEr-D of one caption per key against its references, as pycocoevalcap computes it (x1, not x100).

    Returns (score, tokenizer used).
    """
    from pycocoevalcap.cider.cider import Cider

    keys = list(references)
    if set(predictions) != set(keys):
        raise ValueError("predictions and references must have the same keys")
    if not keys:
        raise ValueError("CIDEr needs at least one sample")
    if any(len(references[k]) == 0 for k in keys):
        raise ValueError("every sample needs at least one reference caption")
    # PTB-tokenize both in one call (one Java start); keys kept apart with a prefix.
    joined = {f"r{i}": list(references[k]) for i, k in enumerate(keys)}
    joined.update({f"p{i}": [predictions[k]] for i, k in enumerate(keys)})
    tokens, used = tokenize(joined, tokenizer)
    gts = {i: tokens[f"r{i}"] for i in range(len(keys))}
    res = {i: tokens[f"p{i}"][:1] for i in range(len(keys))}
    score, _ = Cider().compute_score(gts, res)
    return float(score), used
