"""Structured outputs: OpenAI's `response_format` (`json_object`, `json_schema`) as a grammar every token obeys.

A request's format compiles once (llguidance: a JSON schema -> a grammar over the model's tokenizer, compact JSON:
no free whitespace); each choice then walks it with its own matcher. Before a choice's token is picked, the tokens
the grammar cannot take next get -inf (after penalties, bias and suppression, before temperature and top-p); the
picked token advances the matcher; when the grammar is complete (nothing may follow), the choice ends with `stop`.
The reported logprobs stay the model's own (unconstrained). An answer cut by `max_tokens` is a prefix of valid
JSON, as OpenAI's are.
"""

from __future__ import annotations

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


class GrammarError(ValueError):
    """A response format that cannot be compiled (an invalid or unsupported JSON schema)."""


class Grammar:
    """A compiled response format for one tokenizer: `matcher()` gives a fresh walker for one choice."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        self._prototype = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self._prototype.is_error():
            raise GrammarError(self._prototype.get_error())

    def constraint(self) -> "Constraint":
        return Constraint(self._prototype.deep_copy())


class Constraint:
    """One choice's position in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def restrict(self, logits: torch.Tensor) -> None:
        """logits (V,), in place: the tokens the grammar cannot take next get -inf."""
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)  # (V,)
        logits.masked_fill_(allowed.to(logits.device) == 0, -float("inf"))

    def accept(self, token: int) -> bool:
        """Advance past `token`; True when the grammar is complete (the answer ends here)."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped() or self.matcher.is_error()


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
