"""Chat messages -> one prompt, in the format the served model was trained on (docs/serve.md shows both).

`flamingo` (models trained here, OpenFlamingo's): a conversation is a few-shot prompt.
- `system` and `user` content goes in as it is, in order: each text part's text, `<image>` for each image or video
  part (the medium is the prompt's next one);
- an `assistant` turn is a demo answer: a space (unless the text before it ends in whitespace or the answer starts
  with it), its text, then `<|endofchunk|>`;
- the last message must be the user's: the model continues right after it.
So `<image>Output: a cat.<|endofchunk|><image>Output:` is the conversation user [image, "Output:"], assistant
"a cat.", user [image, "Output:"].

`idefics` (IDEFICS, its instruct models' dialogue format, as their model card and demo write it):
- `system` text first, then a line break;
- each `user` turn is `User:`, a space unless the turn starts with an image (or with whitespace), its content
  (`<image>` per medium; the processor wraps it in `<fake_token_around_image>`), `<end_of_utterance>` and a line break;
- each `assistant` turn is `Assistant:`, a space, its text, `<end_of_utterance>` and a line break;
- the prompt ends with `Assistant:`, which the model continues.
A tokenizer without `<end_of_utterance>` (the base models) gets the same turns ended by the line break alone, and
answers stop at the next `\nUser:`.

`otter` (Otter's instruction format, as its demos and MIMIC-IT training write it,
`<image>User: {question} GPT:<answer> {answer}<|endofchunk|>`):
- `system` text first, then a line break (Otter has no system turn);
- each `user` turn is its media's `<image>`s, then `User: ` and its text;
- each `assistant` turn is ` GPT:<answer> `, its text and `<|endofchunk|>`;
- the prompt ends with ` GPT:<answer>`, which the model continues (answers end at `<|endofchunk|>`).

Either way the model's answer starts with the space the template would put back, so chat answers are sent without
leading whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from ..processing import END_OF_UTTERANCE, IDEFICS_IMAGE_WRAPPER, FlamingoProcessor
from .protocol import APIError, ImagePart, Message, TextPart

OTTER_ANSWER = "<answer>"  # Otter's marker before each answer


@dataclass(frozen=True)
class MediaRef:
    url: str
    video: bool  # given as a video part (a data URL's MIME type decides too)


@dataclass(frozen=True)
class ChatTemplate:
    """Flamingo's conversation format; subclasses write other families'. `reserved`: the format's own markers, which
    message text may not contain (media come as parts); `stops`: stop strings every chat answer ends at, besides the
    model's stop tokens."""

    name: str = "flamingo"
    reserved: tuple[str, ...] = (MEDIA_TOKEN, END_OF_CHUNK_TOKEN)
    stops: tuple[str, ...] = ()

    def render(self, messages: list[Message]) -> tuple[str, list[MediaRef]]:
        """The prompt text (with `<image>` placeholders) and its media, in order."""
        if messages[-1].role != "user":
            raise APIError(400, "the last message must be the user's: the model answers after it", param="messages")
        text: list[str] = []
        media: list[MediaRef] = []
        for i, message in enumerate(messages):
            parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) \
                else message.content
            if message.role != "user" and any(not isinstance(p, TextPart) for p in parts):
                article = "an" if message.role == "assistant" else "a"
                raise APIError(400, f"messages[{i}]: {article} {message.role} turn holds text only", param="messages")
            pieces: list[str] = []
            for part in parts:
                if isinstance(part, TextPart):
                    pieces.append(self._checked(part.text, i))
                else:
                    url = part.image_url.url if isinstance(part, ImagePart) else part.video_url.url
                    media.append(MediaRef(url, video=not isinstance(part, ImagePart)))
                    pieces.append(MEDIA_TOKEN)
            text.append(self.turn(message.role, pieces, "".join(text)))
        return "".join(text) + self.answer_prefix(), media

    def turn(self, role: str, pieces: list[str], before: str) -> str:
        """One message's content (text pieces, `<image>` per medium) -> its text in the prompt, after `before`."""
        content = "".join(pieces)
        if role != "assistant":
            return content
        space = "" if not before or before[-1].isspace() or content[:1].isspace() else " "
        return space + content + END_OF_CHUNK_TOKEN

    def answer_prefix(self) -> str:
        """What follows the last user turn: the model continues after it."""
        return ""

    def _checked(self, text: str, i: int) -> str:
        for token in self.reserved:
            if token in text:
                raise APIError(400, f"messages[{i}]: text may not contain {token}; send images as image_url parts "
                                    "(or a raw prompt to /v1/completions)", param="messages")
        return text


@dataclass(frozen=True)
class IdeficsChat(ChatTemplate):
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
        return ("User:" if role == "user" else "Assistant:") + space + content + self.end_of_turn + "\n"

    def answer_prefix(self) -> str:
        return "Assistant:"


@dataclass(frozen=True)
class OtterChat(ChatTemplate):
    """Otter's format: `<image>User: ... GPT:<answer> ...<|endofchunk|>` per exchange."""

    name: str = "otter"
    reserved: tuple[str, ...] = (MEDIA_TOKEN, END_OF_CHUNK_TOKEN, OTTER_ANSWER)

    def turn(self, role: str, pieces: list[str], before: str) -> str:
        if role == "system":
            return "".join(pieces) + "\n"
        if role == "assistant":
            return self.answer_prefix() + " " + "".join(pieces).lstrip() + END_OF_CHUNK_TOKEN
        media = "".join(p for p in pieces if p == MEDIA_TOKEN)
        return media + "User: " + "".join(p for p in pieces if p != MEDIA_TOKEN).strip()

    def answer_prefix(self) -> str:
        return " GPT:" + OTTER_ANSWER


FLAMINGO = ChatTemplate()
OTTER = OtterChat()


def chat_template_for(processor: FlamingoProcessor, vocab: int) -> ChatTemplate:
    """The conversation format of the model `processor` prepares prompts for (its prompt template decides), whose
    embedding has `vocab` rows: IDEFICS turns end with `<end_of_utterance>` where the model has a row for it."""
    if processor.template == "flamingo":
        return FLAMINGO
    if processor.template == "otter":
        return OTTER
    eou = processor.tokenizer.get_vocab().get(END_OF_UTTERANCE)
    return IdeficsChat(end_of_turn=END_OF_UTTERANCE if eou is not None and eou < vocab else "",
                       reserved=(MEDIA_TOKEN, IDEFICS_IMAGE_WRAPPER) + ((END_OF_UTTERANCE,) if eou is not None else ()))

