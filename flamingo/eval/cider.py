"""CIDEr (Vedantam et al. 2015) through pycocoevalcap, with its PTB tokenizer when Java exists.

pycocoevalcap tokenizes references and candidates with Stanford CoreNLP's PTBTokenizer (`java -cp
stanford-corenlp-3.4.1.jar ... -lowerCase`) and drops punctuation tokens, then computes CIDEr-D over the evaluated
set (the IDF comes from the set's references, so the metric is computed once, on all samples gathered).

Without `java` on PATH we use `python_tokenize`, a re-statement of the PTB lexer's rules (CoreNLP 3.4.1's PTBLexer,
which is caseless) for what captions hold:
- lower case (after tokenizing: a few rules, e.g. "Ill." and "AT&T", read the case as PTB does);
- the clitic split: "n't" and 's 're 've 'll 'd 'm become their own tokens ("don't" -> "do n't", "dog's" ->
  "dog 's"), as do "cannot" -> "can not", "gonna"/"wanna"/"gotta"/"lemme"/"gimme" -> "gon na" ..., "'tis" -> "'t is";
- words are runs of letters/digits; hyphenated ("black-and-white", "3.5-inch"), slashed ("cat/dog", "1/2", up to
  two slashes), "o'clock"-style ("o'", "d'", "l'" + a word), "AT&T"-style and "US$" words stay one token, as do
  "'n'", "'em", "'90s", "y'" (of "y'all") and the like;
- numbers keep inner periods, commas and colons and a sign ("3.5", "1,000", "10:30", "-5", ".5");
- the period stays on abbreviations ("mr.", "st.", "dr.", "jr.", "inc.", "etc.", month and state names, "no." before
  a number), single letters ("a.") and acronyms ("u.s.", "a.m."), and on a word before , ; or :;
- runs of ! ? # @ * _ are one token ("!!", "?!", "##"); curly quotes count as straight ones, "…" as "...", a dash
  (en/em) as "--"; brackets are written as PTB names them ("(" -> "-lrb-": lower-cased by `-lowerCase`, so
  pycocoevalcap keeps them); double quotes are dropped (PTB turns them into `` and '', which pycocoevalcap removes);
  then the punctuation tokens pycocoevalcap removes are removed;
- what PTB drops as untokenizable is dropped, leaving a token break: emoji and every other character beyond the
  BMP, U+FFFD (a generation cut inside a multi-byte character), variation selectors, zero-width and direction marks,
  the byte-order mark ("a dog\ufffds" -> "a dog s"); a soft hyphen is dropped without a break. Half a surrogate pair
  (`"\\ud83d"` in a JSON file: an emoji a scraper cut) is U+FFFD for both tokenizers (UTF-8, which PTB is handed,
  cannot encode it).
Tests pin PTB's own output for each of these forms (tests/test_eval_metrics.py; with Java they also compare live).
What still differs: URLs and e-mail addresses, fraction characters ("½"), an abbreviation run into the next word
("mr.smith"), other rare apostrophe words, characters PTB 3.4.1's lexer reads otherwise (the Unicode hyphen U+2010,
which it keeps inside a word and drops alone; combining marks; other scripts' punctuation), and one thing no
per-caption tokenizer can copy: pycocoevalcap hands PTB every caption as one text, so a single letter's period at the
end of a caption ("plan b.") is dropped when the next caption starts with a capital. The results record which
tokenizer ran: `"tokenizer": "ptb"|"python"`.

With PTB, each caption's line breaks (any `str.splitlines` breaks: "\r", VT, FF, U+2028, ...) become spaces first:
PTB reads the one text line by line, so a caption's own line break would shift every later caption onto the wrong
key; the number of captions PTB returns per key is checked.
"""

from __future__ import annotations

import re
import shutil
import warnings
from typing import Mapping, Sequence

TOKENIZERS = ("auto", "ptb", "python")  # "auto": PTB when `java` is on PATH
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                             "--", "...", ";"])  # pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS
_ALNUM = r"[^\W_]"  # a letter or digit
_ENDS = r"(?![^\W_]|[-/][^\W_])"  # the word ends here (no letter, digit, or hyphen / slash continuation follows)
_THING = rf"(?:[dol]'{_ALNUM})?{_ALNUM}+"  # a word; "o'clock", "d'angelo", "l'oreal" are one
_WORD = rf"{_THING}(?:[-_]{_THING})*"  # hyphenated (or underscored) words are one token
_SPACE = "[ \t\xa0\u2000-\u200a\u3000]"
# capitalised words before which PTB takes a single letter's period for a full stop ("vitamin C. The ...")
_SENTENCE_STARTS = ("About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last|Many|"
                    "More|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Then|There|These|They|"
                    "This|We|When|While|What|Yet|You")
# abbreviations whose period PTB keeps, wherever they stand (its ABBREV1 / ABBREV2 lists as the 3.4.1 jar behaves)
_ABBREVIATIONS = "|".join([
    r"jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu(?:rs)?|fri",  # months, days
    r"ala|ariz|calif|colo|conn|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt|wisc?|wyo",
    r"(?-i:A)rk|(?-i:D)el|(?-i:I)ll|(?-i:L)a|(?-i:M)ass|(?-i:M)iss|(?-i:O)re|(?-i:P)a|(?-i:T)ex|(?-i:W)ash",  # "Ill."
    r"mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt|capt|ste?|ave",
    r"pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mme|mlle|jr|sr|bros|blvd|rd|esq|(?:ph|ed)\.d",  # titles
    r"inc|cos?|corp|pp?tys?|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys|invt|elec|natl|mfg|mtg",  # companies
    r"ph|tel|est|ext|sq|ft|etc|al|seq|vs|alex|wm|jos|cie|cf|treas",
    r"[a-z](?:\.[a-z])+",  # an acronym: "u.s.", "a.m."
    r"[a-z](?=\.(?!" + _SPACE + r"+(?-i:" + _SENTENCE_STARTS + r")(?:\s|$)))",  # "a.", unless "C. The ..."
])
_TOKEN = re.compile(
    r"can(?=not" + _ENDS + ")"  # "cannot" -> "can not"
    r"|(?:gon|wan)(?=na" + _ENDS + r")|got(?=ta" + _ENDS + r")|(?:lem|gim)(?=me" + _ENDS + ")"  # "gon na", ...
    r"|'t(?=(?:is|was)" + _ENDS + ")"  # "'t is"
    r"|[a-z0-9]+[.,][a-z0-9.,]*(?:-[a-z0-9]+)+"  # a hyphenated word whose head has periods: "3.5-inch", "u.s.-made"
    r"|\d{1,4}[- ]\d{1,4}/\d{1,4}"  # a fraction with its whole part: "3-1/2", "3 1/2" (PTB: "3\xa01/2")
    r"|[a-z0-9]+(?:-[a-z]+){0,2}(?:/[a-z0-9]+(?:-[a-z]+){0,2}){1,2}"  # slashed words: "cat/dog", "1/2", "24/7"
    r"|(?-i:[A-Z]+(?:[+&][A-Z]+)+)"  # "AT&T", "Q&A"
    r"|(?-i:[A-Z]+)\$"  # "US$"
    r"|(?:nos?|prop|fig|pp)\.(?= ?\d)"  # "no. 5"
    r"|(?:[a-z](?:\.[a-z])+|(?:ph|ed)\.d)(?=\s|$)"  # an acronym without its last period: "u.s flag", "ph.d"
    r"|(?:" + _ABBREVIATIONS + r")\.(?![^\W\d_])"  # (a letter after the period: the dotted word below)
    r"|" + _ALNUM + r"+(?:\.[^\W\d_]" + _ALNUM + r"*)+(?:\.(?=[,;:]))?"  # joined by periods: "dog.cat", "mr.smith"
    r"|[-+]?\d*(?:[.:,]\d+)+|[-+]\d+"  # numbers: "3.5", "1,000", "10:30", "-5", ".5"
    r"|[^\W\d_]+[aeiouy]'(?!(?:s|re|ve|ll|d|m)(?![^\W\d_]))(?-i:[aeiouA-Z])[^\W\d_]*"  # "go'on", "GO'BO"
    r"|'n'|'n(?!" + _ALNUM + r")|j'|[dl]'(?!" + _ALNUM + "{2})"  # PTB's apostrophe words: "'n'", "j'", "d'"
    r"|dunkin'|somethin'|ol'|'em|'[2-9]0s|'till?|'cause"
    r"|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|y'(?=[^\W\d_])"
    r"|n't[^\W\d_]*"  # clitic negation (after the stem below stopped before it); "don'ts" -> "do n'ts"
    r"|'(?:s|re|ve|ll|d|m)(?![a-z])"  # other clitics
    rf"|{_WORD}(?=n't)"  # a stem followed by n't: "do|n't", "ca|n't"
    rf"|{_WORD}(?:\.(?=[,;:]))?"  # a word; its period stays before , ; or :
    r"|#[^\W\d_]+|@[a-z_][a-z_0-9]*"  # "#tag", "@name"
    r"|[?!]+|#+|@+|\*+|_+|-+"  # runs of these are one token
    r"|\S",
    re.IGNORECASE)
# what PTB's lexer drops as untokenizable (a token break where it stood): characters beyond the BMP (emoji: Java reads
# them as surrogate pairs), U+FFFD (a multi-byte character cut by max_new_tokens), U+FFFC, variation selectors,
# zero-width and direction marks, the byte-order mark; a soft hyphen goes without a break ("foot\xadball"); a lone
# surrogate is read as U+FFFD
_UNTOKENIZABLE = re.compile("[\U00010000-\U0010ffff\ufffc\ufffd\ufe00-\ufe0f\u200b-\u200f\u202a-\u202e"
                            "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # half a pair: no character, and UTF-8 (PTB's input) cannot encode it
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}
# what PTB reads as ASCII quotes, ellipsis and dashes (its latexQuotes / ptb3Ellipsis / ptb3Dashes)
_NORMALIZE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u2039": "'", "\u203a": "'", "\u201c": '"',
                            "\u201d": '"', "\u00ab": '"', "\u00bb": '"', "\u2026": "...", "\u2013": " -- ",
                            "\u2014": " -- ", "\u2015": " -- ", "\n": " "})


def java_available() -> bool:
    return shutil.which("java") is not None


def python_tokenize(text: str) -> str:
    """One caption -> space-joined lower-case tokens without punctuation (see the module docstring)."""
    text = _UNTOKENIZABLE.sub(" ", text.replace("\xad", "")).translate(_NORMALIZE)
    tokens = [_token(t) for t in _TOKEN.findall(text)]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def _token(token: str) -> str:
    """A matched token as PTB writes it, lower-cased: brackets named, a run of 3-4 hyphens as "--", the space of a
    fraction with its whole part non-breaking."""
    if token in _BRACKETS:
        return _BRACKETS[token]
    if 3 <= len(token) <= 4 and set(token) == {"-"}:
        return "--"
    return token.lower().replace(" ", "\xa0")


def tokenize(captions: Mapping[str, Sequence[str]], tokenizer: str = "auto") -> tuple[dict[str, list[str]], str]:
    """{key: [captions]} -> ({key: [tokenized captions]}, the tokenizer used: "ptb" or "python").

    tokenizer: "auto" (PTB when `java` is on PATH), "ptb" or "python".
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "ptb" or (tokenizer == "auto" and java_available()):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        # PTB reads one caption per line of one text: a caption's own line break ("\r", VT, FF, U+2028, a CRLF)
        # would split it in two and pair every later caption with the one before it, so each is joined into one line
        lines = {k: [" ".join(_SURROGATE.sub("\ufffd", c).splitlines()) for c in v] for k, v in captions.items()}
        try:
            out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in lines.items()})
        except Exception as e:  # Java present but unusable (e.g. a read-only site-packages for its temp file)
            if tokenizer == "ptb":
                raise
            warnings.warn(f"PTB tokenizer failed ({e}); using the Python tokenization", stacklevel=2)
        else:
            for k, v in lines.items():
                if len(out.get(k, [])) != len(v):
                    raise RuntimeError(f"the PTB tokenizer returned {len(out.get(k, []))} caption(s) for {k!r}, which "
                                       f"has {len(v)}: the captions were misaligned (first of them: {v[:1]!r})")
            return {k: out.get(k, []) for k in lines}, "ptb"
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
