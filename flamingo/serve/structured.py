"""Structured outputs: OpenAI's `response_format` (`json_object`, `json_schema`) as a grammar every token obeys.

A request's format compiles once (llguidance: a JSON schema -> a grammar over the model's tokenizer, compact JSON:
no free whitespace); each choice then walks it with its own matcher. Before a choice's token is picked, the tokens
the grammar cannot take next get -inf (after penalties, bias and suppression, before temperature and top-p); the
picked token advances the matcher; when the grammar is complete (nothing may follow), the choice ends with `stop`.
The reported logprobs stay the model's own (unconstrained). An answer cut by `max_tokens` is a prefix of valid
JSON, as OpenAI's are.

What llguidance cannot take is refused before it sees it or when the format compiles (a 400): number bounds beyond
+-2**53 (it reads bounds as doubles and builds integer ranges in 64 bits: near -2**63 it crashes the process, past
2**63 it answers values outside the range), a `multipleOf` of many significant digits (its grammar takes minutes to
build), and a schema whose walk fails at once (no JSON value satisfies it, e.g. a `$ref` loop, or its forced
beginning exceeds the parser's limits). A grammar that fails later in an answer (a parser limit) raises
`GrammarFailed`: the engine ends the request with an error, never with a `stop` that would pass the broken JSON off
as complete.
"""

from __future__ import annotations

import decimal
import json
import threading
from typing import Any, Optional

import torch

try:  # the serve extra installs it; a clear error where it is missing
    import llguidance
    import llguidance.hf
except ImportError:  # pragma: no cover - exercised only without the serve extra
    llguidance = None

# compact JSON: a model that cannot pad with whitespace writes the answer sooner (OpenAI's answers are compact too)
_JSON_OPTIONS = {"whitespace_flexible": False}
BOUND_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
DATA_KEYWORDS = ("const", "enum", "default", "examples")  # their values are JSON data, not schemas: not walked
NAME_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema maps
BOUND_LIMIT = 2**53  # bounds within +-2**53 are exact as doubles, as llguidance reads them, and far from its 64 bits
# llguidance builds the multiples of `multipleOf` as an automaton that grows with its significant digits: 4 take
# under 0.1 s to build, 5 up to seconds, 6 tens of seconds, 10 more than minutes (a worker thread held all along)
MAX_MULTIPLE_DIGITS = 4


class GrammarError(ValueError):
    """A response format that cannot be compiled (an invalid or unsupported JSON schema)."""


class GrammarFailed(RuntimeError):
    """A choice's grammar broke mid-answer (a parser limit): the answer so far is no complete JSON."""


def check_numbers(schema: Any) -> None:
    """Refuse a schema, before llguidance sees it, with a number llguidance cannot take (anywhere in it): a bound
    (`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`) outside +-2**53, which crashes the process or
    clamps (module docstring), or a `multipleOf` of more than `MAX_MULTIPLE_DIGITS` significant digits."""
    stack: list[tuple[Any, str, bool]] = [(schema, "schema", False)]  # (node, where, a map of names to schemas)
    while stack:
        node, where, names = stack.pop()
        if isinstance(node, dict) and names:  # `properties`, `$defs`, ...: any key is a name, each value a schema
            stack.extend((value, f"{where}.{key}", False) for key, value in node.items())
        elif isinstance(node, dict):
            for key, value in node.items():
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if number and key in BOUND_KEYWORDS and not -BOUND_LIMIT <= value <= BOUND_LIMIT:  # NaN too
                    raise GrammarError(f"{where}.{key} = {value!r}: number bounds outside +-2**53 "
                                       f"({BOUND_LIMIT}) are not supported")
                if number and key == "multipleOf" and _significant_digits(value) > MAX_MULTIPLE_DIGITS:
                    raise GrammarError(f"{where}.multipleOf = {value!r}: at most {MAX_MULTIPLE_DIGITS} significant "
                                       "digits are supported (the grammar of its multiples grows with them)")
                if key not in DATA_KEYWORDS:
                    stack.append((value, f"{where}.{key}", key in NAME_MAPS))
        elif isinstance(node, list):
            stack.extend((value, f"{where}[{i}]", False) for i, value in enumerate(node))


def _significant_digits(value: float) -> int:
    """A number's significant digits as written (trailing zeros dropped): 0.0125 -> 3, 5000 -> 1, 99991 -> 5."""
    exact = decimal.Decimal(repr(value) if isinstance(value, float) else value)  # the shortest decimal of a double
    return len(exact.normalize().as_tuple().digits) if exact.is_finite() else 0


def _error_of(matcher: Any) -> str:
    """A matcher's error in one line (llguidance appends its parser state)."""
    return matcher.get_error().split("\n", 1)[0]


class Grammar:
    """A compiled response format for one tokenizer: `constraint()` gives a fresh walker for one choice."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        self._prototype = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self._prototype.is_error():
            raise GrammarError(self._prototype.get_error())
        # walk the answer's start (its first mask, the tokens it forces, the next mask) on a copy: a schema that no
        # value satisfies, or whose forced start exceeds the parser's limits, fails here, not as an empty answer
        probe = self._prototype.deep_copy()
        probe.compute_logit_bias()
        if not probe.is_error():
            probe.consume_tokens(probe.compute_ff_tokens())
            if not probe.is_error() and not probe.is_stopped():
                probe.compute_logit_bias()
        if probe.is_error():
            error = _error_of(probe)
            if error == "NoExtensionBias":  # llguidance's "no token can come first"
                error = "no JSON value satisfies it (a $ref loop?)"
            raise GrammarError(f"the schema cannot be followed: {error}")

    def constraint(self) -> "Constraint":
        return Constraint(self._prototype.deep_copy())


class Constraint:
    """One choice's position in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def restrict(self, logits: torch.Tensor) -> None:
        """logits (V,), in place: the tokens the grammar cannot take next get -inf."""
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)  # (V,)
        if self.matcher.is_error():  # no mask to trust (it may allow nothing): `accept` reports the error next
            return
        logits.masked_fill_(allowed.to(logits.device) == 0, -float("inf"))

    def accept(self, token: int) -> bool:
        """Advance past `token`; True when the grammar is complete (the answer ends here). GrammarFailed when the
        grammar broke (the answer is no complete JSON)."""
        self.matcher.consume_token(token)
        if self.matcher.is_error():
            raise GrammarFailed(f"response_format: the grammar failed mid-answer: {_error_of(self.matcher)}")
        return self.matcher.is_stopped()


class Grammars:
    """Compiles response formats for one model's tokenizer (the tokenizer's grammar tables are built once, on first
    use: about a second for a large vocabulary)."""

    def __init__(self, tokenizer: Any, vocab: int, eos: list[int]) -> None:
        self.tokenizer, self.vocab, self.eos = tokenizer, vocab, eos
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None

    def compile(self, response_format: Optional[dict[str, Any]]) -> Optional[Grammar]:
        """OpenAI's `response_format` (as a plain dict) -> a Grammar, None for plain text."""
        kind = (response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if llguidance is None:
            raise GrammarError("structured outputs need llguidance (pip install 'flamingo-vlm[serve]')")
        if kind == "json_object":
            schema: Any = {"type": "object"}
        else:  # json_schema, checked by the request schema
            schema = response_format["json_schema"]["schema"]
            check_numbers(schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(str(e)) from None
        return Grammar(self._tokenizer(), grammar)

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab,
                                                                  eos_token=self.eos)
            return self._ll_tokenizer
