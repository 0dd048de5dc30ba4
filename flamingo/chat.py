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
"Output:"].

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
- `system` text first, then a line break (Otter has no system turn);
- each `user` turn is its media's `<image>`s, then `User: ` and its text;
- each `assistant` turn is ` GPT:<answer> `, its text and `<|endofchunk|>`;
- the prompt ends with ` GPT:<answer>`, which the model continues (answers end at `<|endofchunk|>`).

`mmgpt` (Multimodal-GPT's Alpaca-style format, as its demo and instruction data write it):
- a preamble: the `system` text, else `MMGPT_PREAMBLE`;
- each `user` turn is `\n\n### Image:\n<image>` per medium, then `\n\n### Instruction:\n` and its text;
- each `assistant` turn is `\n\n### Response:\n`, its text and the tokenizer's EOS (its released training code,
  mmgpt 0.0.1, ends answers so);
- the prompt ends with `\n\n### Response:\n`, which the model continues: answers end at EOS, at a new
  `\n\n### Instruction:`, or at `### End.`, the end marker an early version of its training code wrote before EOS
  (the released weights may have learned it; docs/serve.md).

An assistant turn is (lead, answer, end): the answer text and the end marker are what chat training trains on
(`segments`); the lead is the format's answer prefix (what a prompt ends with) and a gap, so that what follows a
prompt (`answer`: gap, answer, end) is what ranked candidates are scored as (`flamingo eval --chat`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from .config import END_OF_CHUNK_TOKEN, END_OF_UTTERANCE, IDEFICS_IMAGE_WRAPPER, MEDIA_TOKEN

if TYPE_CHECKING:
    from .processing import FlamingoProcessor

ROLES = ("system", "user", "assistant")
OTTER_ANSWER = "<answer>"  # Otter's marker before each answer
MMGPT_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                  "request.")  # Multimodal-GPT's (Alpaca's) default system text
MMGPT_SEPARATOR = "\n\n### "
MMGPT_END = "### End."  # an answer end Multimodal-GPT's weights may write (module docstring)


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    pieces: tuple[str, ...]  # text, and MEDIA_TOKEN for each medium (user turns only)


@dataclass(frozen=True)
class ChatFormat:
    """Flamingo's conversation format; subclasses write other families'. `reserved`: the format's own markers, which
    message text may not contain (media come as pieces of their own); `stops`: strings every answer ends at,
    besides the model's stop tokens."""

    name: str = "flamingo"
    reserved: tuple[str, ...] = (MEDIA_TOKEN, END_OF_CHUNK_TOKEN)
    stops: tuple[str, ...] = ()

    def render(self, turns: Sequence[Turn]) -> str:
        """The prompt: the turns, then what the model continues after (a conversation ending with a user turn)."""
        return "".join(text for text, _ in self.segments(turns)) + self.answer_prefix()

    def segments(self, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
        """The turns' text as (piece, is an answer) in order: answers (an assistant turn's text and end marker) are
        True. Their concatenation is the conversation as written."""
        out: list[tuple[str, bool]] = []
        before = ""
        for turn in turns:
            content = "".join(turn.pieces)
            if turn.role == "assistant":
                lead, answer, end = self.assistant(content, before)
                parts = [(lead, False), (answer + end, True)]
            else:
                parts = [(self.turn(turn.role, list(turn.pieces)), False)]
            for text, trained in parts:
                if text:
                    out.append((text, trained))
                    before += text
        return out

    def first_reserved(self, text: str) -> Optional[str]:
        """The first of the format's markers `text` contains, or None."""
        return next((token for token in self.reserved if token in text), None)

    def turn(self, role: str, pieces: list[str]) -> str:
        """A system or user turn's pieces -> its text in the prompt."""
        return "".join(pieces)

    def assistant(self, content: str, before: str) -> tuple[str, str, str]:
        """An assistant turn after the text `before` -> (the format's lead, the answer, its end marker): the lead is
        `answer_prefix()` (what a prompt ends with) and the gap `answer` puts after it."""
        gap, answer, end = self.answer(content, before + self.answer_prefix())
        return self.answer_prefix() + gap, answer, end

    def answer(self, content: str, before: str) -> tuple[str, str, str]:
        """What follows `answer_prefix()` (ending the text `before`) for an answer `content`: (gap, answer, end
        marker). A prompt's continuation is their concatenation (what ranked candidates are scored as)."""
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

    def turn(self, role: str, pieces: list[str]) -> str:
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

    def turn(self, role: str, pieces: list[str]) -> str:
        if role == "system":
            return "".join(pieces) + "\n"
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

    def segments(self, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
        if not turns or turns[0].role != "system":
            turns = [Turn("system", (MMGPT_PREAMBLE,)), *turns]
        return super().segments(turns)

    def turn(self, role: str, pieces: list[str]) -> str:
        if role == "system":
            return "".join(pieces)
        images = "".join(MMGPT_SEPARATOR + "Image:\n" + MEDIA_TOKEN for p in pieces if p == MEDIA_TOKEN)
        return images + MMGPT_SEPARATOR + "Instruction:\n" + text_around_media(pieces)

    def answer(self, content: str, before: str) -> tuple[str, str, str]:
        return "", content.strip(), self.end_of_answer

    def answer_prefix(self) -> str:
        return MMGPT_SEPARATOR + "Response:\n"


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
    model has a row for it."""
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
