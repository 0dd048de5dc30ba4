"""Conversations -> one prompt in the format a model was trained on: the server's chat (serve/template.py) and
chat training data (data/chat.py) write them with the same code, so a model tuned on conversations is served the
prompts it was tuned on.

A conversation is a list of `Turn`s: a role (`system`, `user`, `assistant`) and its pieces, text or `<image>` (one
per medium, in order). Formats (chosen by the processor's template, `chat_format_for`):

`flamingo` (models trained here, OpenFlamingo's): a conversation is a few-shot prompt.
- `system` and `user` pieces go in as they are, in order;
- an `assistant` turn is a demo answer: a space (unless the text before it ends in whitespace or the answer starts
  with it), its text, then `<|endofchunk|>`;
- the model continues right after the last user turn.
So `<image>Output: a cat.<|endofchunk|><image>Output:` is user [image, "Output:"], assistant "a cat.", user [image,
"Output:"]. Spaces and tabs that end the text an answer follows (or the prompt) are left to the answer's gap:
user "Output: " then assistant "a cat." is `Output: a cat.`, and a prompt ending "Output: " ends `Output:`. So the
served prompt ends before the gap, and the answer's first token is the one the tokenizer writes the gap with: most
write a word's leading space into the word's token (GPT-2's ` a`, LLaMA's `▁a`), but where the vocabulary has no such
token (a digit on LLaMA's or Llama-3's, ` 2` -> `▁`, `2`) it is a lone space token, which the served model must write
first. Either way it is the same where it is trained, served and scored: the gap belongs to the answer.

`idefics` (IDEFICS, its instruct models' dialogue format, as their model card and demo write it):
- `system` text first, then a line break;
- each `user` turn is `User:`, a space unless the turn starts with an image (or with whitespace), its pieces
  (`<image>` per medium; the processor wraps it in `<fake_token_around_image>`), `<end_of_utterance>` and a line break;
- each `assistant` turn is `Assistant:`, a space, its text, `<end_of_utterance>` and a line break;
- the prompt ends with `Assistant:`, which the model continues.
A tokenizer without `<end_of_utterance>` (the base models) gets the same turns ended by the line break alone, and
answers stop at the next `\\nUser:`.

`otter` (Otter's instruction format, as its demos and MIMIC-IT training write it,
`<image>User: {question} GPT:<answer> {answer}<|endofchunk|>`):
- `system` text first, then a line break (Otter has no system turn); a later one on a line of its own;
- each `user` turn is its media's `<image>`s, then `User: ` and its text; consecutive user turns are one (their media
  first, their texts joined by a space): Otter trains one question per answer, and an OpenAI client that sends an
  image message and then its question gets `<image>User: {question}`, not `User: User: {question}`;
- each `assistant` turn is ` GPT:<answer> `, its text and `<|endofchunk|>`;
- the prompt ends with ` GPT:<answer>`, which the model continues (answers end at `<|endofchunk|>`).

`mmgpt` (Multimodal-GPT's Alpaca-style format, as its demo and instruction data write it):
- a preamble: the `system` text, else `MMGPT_PREAMBLE`; a later `system` text is a paragraph of its own (`\n\n`
  before it);
- each `user` turn is `\n\n### Image:\n<image>` per medium, then `\n\n### Instruction:\n` and its text;
  consecutive user turns are one, as in Otter's format (one instruction per response, as its data writes them);
- each `assistant` turn is `\n\n### Response:\n`, its text and the tokenizer's EOS (its released training code,
  mmgpt 0.0.1, ends answers so);
- the prompt ends with `\n\n### Response:\n`, which the model continues: answers end at EOS, at a new
  `\n\n### Instruction:`, or at `### End.`, the end marker an early version of its training code wrote before EOS
  (the released weights may have learned it; docs/serve.md).

An assistant turn is the format's answer prefix (what a prompt ends with), then what follows the prompt (`answer`:
gap, answer text, end marker): that is what chat training trains on (`segments`) and what ranked candidates are
scored as (`flamingo eval --chat`). An answer ends at the model's stop tokens or at the first of the format's
`stops` (`cut`): the server, `generate --chat` and `eval --chat` cut there alike.

On a model with image reference tokens (MMICL-style, `FlamingoConfig.num_image_references` = K), a system or user
turn may name an image the conversation has shown with `<imagek>` (`What colour is <image0>?`): the prompt holds the
reference token, as the model's conversations were trained (`ChatFormat.unshown_reference` refuses one naming an
image not shown at that point, for the server, `generate --chat` and chat training data alike).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from .config import END_OF_CHUNK_TOKEN, END_OF_UTTERANCE, IDEFICS_IMAGE_WRAPPER, MEDIA_TOKEN
from .references import REFERENCE, reference_token, unshown_reference

if TYPE_CHECKING:
    from .processing import FlamingoProcessor

ROLES = ("system", "user", "assistant")
OTTER_ANSWER = "<answer>"  # Otter's marker before each answer
MMGPT_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                  "request.")  # Multimodal-GPT's (Alpaca's) default system text
MMGPT_SEPARATOR = "\n\n### "
MMGPT_END = "### End."  # an answer end Multimodal-GPT's weights may write (module docstring)
BLANKS = " \t"  # what ends a text an answer follows, left to the answer's gap (flamingo format)


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    pieces: tuple[str, ...]  # text, and MEDIA_TOKEN for each medium (user turns only)


@dataclass(frozen=True)
class ChatFormat:
    """Flamingo's conversation format; subclasses write other families'. `reserved`: the format's own markers, which
    message text may not contain (media come as pieces of their own); `stops`: strings every answer ends at,
    besides the model's stop tokens; `one_question`: consecutive user turns are written as one (formats that train
    one question per answer); `media_first`: a user turn's media are written before its text (`text_around_media`);
    `references`: the model's image reference tokens `<image0>`... (`chat_format_for`), with which a system or user
    turn may name an image the conversation has shown (`unshown_reference`)."""

    name: str = "flamingo"
    reserved: tuple[str, ...] = (MEDIA_TOKEN, END_OF_CHUNK_TOKEN)
    stops: tuple[str, ...] = ()
    one_question: bool = False
    media_first: bool = False
    references: int = 0

    def render(self, turns: Sequence[Turn]) -> str:
        """The prompt: the turns, then what the model continues after (a conversation ending with a user turn)."""
        return self.prompt_of(self.segments(turns))

    def prompt_of(self, segments: Sequence[tuple[str, bool]]) -> str:
        """`render` of the turns whose `segments` these are (for a caller that has them: chat training data)."""
        text = "".join(text for text, _ in segments) + self.answer_prefix()
        return text if self.answer_prefix() else text.rstrip(BLANKS)  # the blanks are the answer's (module doc)

    def segments(self, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
        """The turns' text as (piece, is an answer) in order: answers (an assistant turn's gap, text and end marker:
        all that follows the prompt `render` writes before it) are True. Their concatenation is the conversation as
        written."""
        out: list[tuple[str, bool]] = []
        for turn in self.merged(turns):
            content = "".join(turn.pieces)
            if turn.role == "assistant":
                if not self.answer_prefix():  # the answer follows the text itself: its blanks go to the gap
                    _drop_blanks(out)
                gap, answer, end = self.answer(content, _tail(out) + self.answer_prefix())
                parts = [(self.answer_prefix(), False), (gap + answer + end, True)]
            else:
                parts = [(self.turn(turn.role, list(turn.pieces), _tail(out)), False)]
            out += [(text, trained) for text, trained in parts if text]
        return out

    def merged(self, turns: Sequence[Turn]) -> list[Turn]:
        """`turns` with each run of consecutive user turns one turn (their pieces in order) where the format asks
        one question per answer (`one_question`); as they are otherwise."""
        out: list[Turn] = []
        runs: list[list[str]] = []  # each output turn's pieces, gathered once (a tuple grown per turn is quadratic)
        for turn in turns:
            if self.one_question and out and turn.role == out[-1].role == "user":
                runs[-1].extend(turn.pieces)
            else:
                out.append(turn)
                runs.append(list(turn.pieces))
        return [turn if len(run) == len(turn.pieces) else Turn(turn.role, tuple(run)) for turn, run in zip(out, runs)]

    def first_reserved(self, text: str) -> Optional[str]:
        """The first of the format's markers `text` contains, or None."""
        return next((token for token in self.reserved if token in text), None)

    def refused(self, control: Mapping[str, str], role: str) -> dict[str, str]:
        """The `control` tokens (`control_tokens`) a `role` turn's text may not hold: all of them but the reference
        tokens, which an assistant turn holds as the model generated them (answers keep them) and a system or user
        turn may use to name an image shown before it (checked by `unshown_reference`)."""
        if role == "assistant":
            return {t: what for t, what in control.items() if not REFERENCE.fullmatch(t)}
        allowed = {reference_token(k) for k in range(self.references)}
        return {t: what for t, what in control.items() if t not in allowed}

    def unshown_reference(self, turns: Sequence[Turn]) -> Optional[tuple[int, str]]:
        """The first reference (`<imagek>`, k < `references`) in a system or user turn's text to an image the
        conversation has not shown at that point -> (the index of its turn, an error naming the tag and the images
        shown there); None if none. Images count in the order the prompt places them: in order across turns, and
        within a turn where they stand, or before its text in a format that writes a user turn's media first (before
        the text of the whole run of user turns it writes as one question). The same tag is then what the model
        reads: its reference token, which the masking rule aims at image k. An assistant turn's references are the
        model's own (its answer kept them) and are not checked."""
        if not self.references:
            return None
        shown, start = 0, 0
        while start < len(turns):
            end = start + 1  # turns[start:end]: what the format writes as one turn
            if self.media_first and turns[start].role == "user":
                while self.one_question and end < len(turns) and turns[end].role == "user":
                    end += 1
                shown += sum(p == MEDIA_TOKEN for turn in turns[start:end] for p in turn.pieces)  # written first
            for i in range(start, end):
                for piece in turns[i].pieces:
                    if piece == MEDIA_TOKEN:
                        shown += 0 if self.media_first and turns[i].role == "user" else 1
                    elif turns[i].role != "assistant":
                        error = unshown_reference(piece, shown, self.references)
                        if error is not None:
                            return i, error
            start = end
        return None

    def spelled(self, turns: Sequence[Turn], strings: Sequence[str], *, rendered: str) -> Optional[tuple[int, str]]:
        """The first of `strings` (markers, control tokens) that the text of `turns` holds more often than the format
        writes it and the turns' pieces hold it: one that pieces written with nothing between them spell together
        (text parts `a <|endof`, `chunk|> b` of one turn; in the flamingo format, consecutive user or system turns),
        which a check piece by piece misses -> (the index of the turn that completes it, the string); None if none.
        `rendered`: `render(turns)`, which the caller writes anyway (the prompt it sends; chat data's `prompt_of` its
        segments), checked as it is rather than written again."""
        def excess(prefix: Sequence[Turn], text: Optional[str] = None) -> Optional[str]:
            text = self.render(prefix) if text is None else text
            own = self.render([Turn(t.role, tuple(p for p in t.pieces if p == MEDIA_TOKEN)) for t in prefix])
            pieces = "\0".join(p for t in prefix for p in t.pieces if p != MEDIA_TOKEN)  # each counted alone
            return next((s for s in strings if (n := text.count(s)) and n > own.count(s) + pieces.count(s)), None)

        if excess(turns, rendered) is None:
            return None
        low, high = 0, len(turns) - 1  # the shortest prefix that spells one: more turns never spell fewer
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if excess(turns[:middle + 1]) is not None else (middle + 1, high)
        return low, excess(turns[:low + 1]) or ""

    def cut(self, text: str) -> str:
        """An answer's text up to the first of the format's `stops` (where a served answer ends), without it."""
        return text[:min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=len(text))]

    def turn(self, role: str, pieces: list[str], before: str) -> str:
        """A system or user turn's pieces -> its text in the prompt, after the text `before`."""
        return "".join(pieces)

    def answer(self, content: str, before: str) -> tuple[str, str, str]:
        """What follows `answer_prefix()` (ending the text `before`, a prompt) for an answer `content`: (gap, answer,
        end marker). A prompt's continuation is their concatenation (what ranked candidates are scored as)."""
        before = before.rstrip(BLANKS) if not self.answer_prefix() else before  # as `render` ends a prompt
        space = "" if not before or before[-1].isspace() or content[:1].isspace() else " "
        return space, content, END_OF_CHUNK_TOKEN

    def answer_prefix(self) -> str:
        """What follows the last user turn: the model continues after it."""
        return ""


@dataclass(frozen=True)
class IdeficsChat(ChatFormat):
    """IDEFICS's dialogue format: `User:` / `Assistant:` turns ended by `end_of_turn` and a line break."""

    name: str = "idefics"
    end_of_turn: str = END_OF_UTTERANCE  # "" for models without it (the base models)
    reserved: tuple[str, ...] = (MEDIA_TOKEN, IDEFICS_IMAGE_WRAPPER, END_OF_UTTERANCE)
    stops: tuple[str, ...] = ("\nUser:",)

    def turn(self, role: str, pieces: list[str], before: str) -> str:
        content = "".join(pieces)
        if role == "system":
            return content + "\n"
        space = "" if pieces[:1] == [MEDIA_TOKEN] or content[:1].isspace() else " "
        return "User:" + space + content + self.end_of_turn + "\n"

    def answer(self, content: str, before: str) -> tuple[str, str, str]:
        return "" if content[:1].isspace() else " ", content, self.end_of_turn + "\n"

    def answer_prefix(self) -> str:
        return "Assistant:"


@dataclass(frozen=True)
class OtterChat(ChatFormat):
    """Otter's format: `<image>User: ... GPT:<answer> ...<|endofchunk|>` per exchange."""

    name: str = "otter"
    reserved: tuple[str, ...] = (MEDIA_TOKEN, END_OF_CHUNK_TOKEN, OTTER_ANSWER)
    one_question: bool = True
    media_first: bool = True

    def turn(self, role: str, pieces: list[str], before: str) -> str:
        if role == "system":  # a later one on a line of its own, not glued to the question before it
            return ("\n" if before and not before.endswith("\n") else "") + "".join(pieces) + "\n"
        media = "".join(p for p in pieces if p == MEDIA_TOKEN)
        return media + "User: " + text_around_media(pieces)

    def answer(self, content: str, before: str) -> tuple[str, str, str]:
        return " ", content.lstrip(), END_OF_CHUNK_TOKEN

    def answer_prefix(self) -> str:
        return " GPT:" + OTTER_ANSWER


@dataclass(frozen=True)
class MMGPTChat(ChatFormat):
    """Multimodal-GPT's format: a preamble, then `### Image:` / `### Instruction:` / `### Response:` sections."""

    name: str = "mmgpt"
    end_of_answer: str = ""  # the tokenizer's EOS
    reserved: tuple[str, ...] = (MEDIA_TOKEN, END_OF_CHUNK_TOKEN)
    stops: tuple[str, ...] = (MMGPT_SEPARATOR + "Instruction:", MMGPT_END)
    one_question: bool = True
    media_first: bool = True

    def segments(self, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
        if not turns or turns[0].role != "system":
            turns = [Turn("system", (MMGPT_PREAMBLE,)), *turns]
        return super().segments(turns)

    def turn(self, role: str, pieces: list[str], before: str) -> str:
        if role == "system":  # the preamble, or a later paragraph of its own
            return ("\n\n" if before else "") + "".join(pieces)
        images = "".join(MMGPT_SEPARATOR + "Image:\n" + MEDIA_TOKEN for p in pieces if p == MEDIA_TOKEN)
        return images + MMGPT_SEPARATOR + "Instruction:\n" + text_around_media(pieces)

    def answer(self, content: str, before: str) -> tuple[str, str, str]:
        return "", content.strip(), self.end_of_answer

    def answer_prefix(self) -> str:
        return MMGPT_SEPARATOR + "Response:\n"


TAIL = 256  # what `turn` and `answer` are shown of the text before them (they read its last characters)


def _tail(out: list[tuple[str, bool]]) -> str:
    """The last `TAIL` characters of the text of `out`, without joining it all (a conversation of many turns would
    copy its whole text at each one)."""
    parts, size = [], 0
    for text, _ in reversed(out):
        parts.append(text[-(TAIL - size):])
        size += len(parts[-1])
        if size >= TAIL:
            break
    return "".join(reversed(parts))


def _drop_blanks(out: list[tuple[str, bool]]) -> int:
    """Remove the spaces and tabs that end the text of `out` (its last pieces that are no answer) -> how many."""
    dropped = 0
    while out and not out[-1][1]:
        text = out[-1][0].rstrip(BLANKS)
        dropped += len(out[-1][0]) - len(text)
        if text:
            out[-1] = (text, False)
            break
        out.pop()
    return dropped


def text_around_media(pieces: list[str]) -> str:
    """A turn's text runs with its media taken out (formats that put a turn's images first), stripped: where an image
    stood between two runs, one space unless either side has white space already (`What is`, image, `this?` ->
    `What is this?`, not `What isthis?`; `What is `, image, ` this?` -> one space; a newline kept)."""
    text = ""
    for run in (p for p in pieces if p != MEDIA_TOKEN):
        if text and run:
            if text[-1].isspace() and run[0].isspace():
                run = run.lstrip(" ")
            elif not text[-1].isspace() and not run[0].isspace():
                text += " "
        text += run
    return text.strip()


def pieces_of(text: str) -> tuple[str, ...]:
    """Text with `<image>` placeholders -> a turn's pieces: its text runs and one MEDIA_TOKEN per placeholder."""
    parts = text.split(MEDIA_TOKEN)
    pieces = [parts[0]]
    for part in parts[1:]:
        pieces += [MEDIA_TOKEN, part]
    return tuple(p for p in pieces if p)


FLAMINGO = ChatFormat()
OTTER = OtterChat()


def chat_format_for(processor: "FlamingoProcessor", vocab: Optional[int] = None) -> ChatFormat:
    """The conversation format of the model `processor` prepares prompts for (its prompt template decides), whose
    embedding has `vocab` rows (default: the tokenizer's size): IDEFICS turns end with `<end_of_utterance>` where the
    model has a row for it; a model with image reference tokens may be asked about an image it was shown by them
    (`ChatFormat.references`)."""
    fmt = _template_format(processor, vocab)
    return replace(fmt, references=processor.num_references) if processor.num_references else fmt


def _template_format(processor: "FlamingoProcessor", vocab: Optional[int]) -> ChatFormat:
    if processor.template == "flamingo":
        return FLAMINGO
    if processor.template == "otter":
        return OTTER
    if processor.template == "mmgpt":
        eos = processor.tokenizer.eos_token or ""
        return MMGPTChat(end_of_answer=eos, reserved=(MEDIA_TOKEN, END_OF_CHUNK_TOKEN) + ((eos,) if eos else ()))
    vocab = len(processor.tokenizer) if vocab is None else vocab
    eou = processor.tokenizer.get_vocab().get(END_OF_UTTERANCE)
    return IdeficsChat(end_of_turn=END_OF_UTTERANCE if eou is not None and eou < vocab else "",
                       reserved=(MEDIA_TOKEN, IDEFICS_IMAGE_WRAPPER) + ((END_OF_UTTERANCE,) if eou is not None else ()))


# a special token's role in the tokenizer's map -> how an error names it
_ROLES = {"bos_token": "BOS", "eos_token": "EOS", "unk_token": "unknown-word token", "sep_token": "separator token",
          "pad_token": "pad token", "cls_token": "CLS token", "mask_token": "mask token"}


def control_tokens(processor: "FlamingoProcessor") -> dict[str, str]:
    """The strings `processor`'s tokenizer reads as control tokens, not text -> what each is (for errors): the
    tokenizer's special tokens (BOS, EOS, pad, unknown, its added special tokens) and the model's image reference
    tokens; longest first, so that a text holding one is told the longest it holds."""
    tok = processor.tokenizer
    names: dict[str, list[str]] = {}
    for role, token in tok.special_tokens_map.items():
        if isinstance(token, str) and role in _ROLES:
            names.setdefault(token, []).append(_ROLES[role])
    specials = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    out = {t: "the tokenizer's " + "/".join(names[t]) if t in names else "a special token of the tokenizer"
           for t in specials if t}
    for k in range(processor.num_references):
        out[reference_token(k)] = f"the model's reference token for image {k}"
    return dict(sorted(out.items(), key=lambda item: -len(item[0])))
