"""Chat messages -> one prompt, in the format the served model was trained on (flamingo/chat.py writes the formats;
docs/serve.md shows them): OpenAI messages become `Turn`s, checked as a request.

- the last message must be the user's: the model answers after it;
- system and assistant turns hold text only; user turns hold text, image and video parts (each medium is the
  prompt's next one, `<image>` in its place); a user turn written as lm-evaluation-harness writes image prompts (its
  media parts first, then text holding one `<image>` per medium: `media_placed_in_text`) has each medium where its
  `<image>` stands;
- text may not contain the format's markers (media come as parts; a raw prompt goes to /v1/completions), nor the
  strings the tokenizer reads as control tokens (`control_tokens`: its BOS, EOS, pad and other special tokens): in
  text they would become those tokens, not characters, so a user could end a turn from plain text. Both are refused
  (400). The image reference tokens `<image0>`... of a model with them are the exception: a system or user turn may
  name an image the conversation has shown (`What colour is <image0>?`, as MMICL-style conversations are trained),
  and one naming an image not shown at that point is refused (`ChatFormat.unshown_reference`); an assistant turn
  holds the references the model generated (the server keeps them in the text), and a conversation sent back must
  mean what the model wrote. Text the format writes with nothing between it (a turn's text parts in the flamingo and
  idefics formats; consecutive user and system turns in the flamingo format) is checked as written too: `a <|endof`
  then `chunk|> b` is the marker there (Otter's and Multimodal-GPT's formats put a space between a turn's texts:
  there it is text), as chat training data checks it; a reference tag split so is refused too.
Answers start with the space the format puts back, so chat answers are sent without their leading spaces and tabs
(a line break or another character an answer starts with is the model's, and kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from ..chat import ChatFormat, Turn
from ..config import MEDIA_TOKEN
from .protocol import APIError, ContentPart, ImagePart, Message, TextPart


@dataclass(frozen=True)
class MediaRef:
    url: str
    video: bool  # given as a video part (a data URL's MIME type decides too)


def check_text(fmt: ChatFormat, control: Mapping[str, str], text: str, i: int, role: str = "user") -> None:
    """APIError (400) when message `i`'s `text` (a run of text between its media) holds one of the format's markers
    or a `control` token. An assistant turn's text is an answer sent back: one that spells a marker or control token
    (the model wrote it as ordinary text, piece by piece) would be read as that token, so the conversation cannot go
    on with it as written; the error says so."""
    marker = fmt.first_reserved(text)
    token = marker if marker is not None else next((t for t in control if t in text), None)
    if token is None:
        return
    if role == "assistant":
        raise APIError(400, f"messages[{i}]: this assistant turn spells {token}, which the prompt would read as the "
                            f"{'format' if marker is not None else 'tokenizer'}'s token rather than as the text the "
                            "answer held: edit or drop that answer to go on (or start a new conversation)",
                       param="messages")
    if marker is not None:
        raise APIError(400, f"messages[{i}]: text may not contain {marker}; send images as image_url parts (or a raw "
                            "prompt to /v1/completions)", param="messages")
    raise APIError(400, f"messages[{i}]: text may not contain {token} ({control[token]}): a chat's control "
                        "tokens come from its template (a raw prompt to /v1/completions may write them)",
                   param="messages")


def media_placed_in_text(parts: list[ContentPart], i: int) -> list[ContentPart]:
    """A user turn's parts (message `i`) with its media where its text places them, when the turn is written as
    lm-evaluation-harness writes image prompts (`create_image_prompt`: the media parts first, then text parts that
    hold exactly one `<image>` per medium): each `<image>` becomes the next medium, in part order. APIError (400) when
    such a turn's `<image>`s are not as many as its media (lm-eval cuts a request's images to its `max_images`, 1 by
    default); any other turn's parts as they are (an `<image>` in their text is refused by `check_text`)."""
    n = sum(not isinstance(p, TextPart) for p in parts)
    texts = parts[n:]
    if not n or any(not isinstance(p, TextPart) for p in texts):
        return parts
    placed_by_text = sum(p.text.count(MEDIA_TOKEN) for p in texts)
    if placed_by_text and placed_by_text != n:
        raise APIError(400, f"messages[{i}]: text may not contain {MEDIA_TOKEN} unless each one places one of the "
                            f"turn's media, which come before it: {placed_by_text} {MEDIA_TOKEN} for {n} "
                            f"medi{'um' if n == 1 else 'a'} (lm-evaluation-harness sends at most `max_images` images a "
                            "request, 1 unless its --model_args set it)", param="messages")
    if not placed_by_text:
        return parts
    media, placed = iter(parts[:n]), []
    for part in texts:
        for k, piece in enumerate(part.text.split(MEDIA_TOKEN)):
            if k:
                placed.append(next(media))
            if piece:
                placed.append(TextPart(type="text", text=piece))
    return placed


def render_messages(fmt: ChatFormat, messages: list[Message],
                    control: Optional[Mapping[str, str]] = None) -> tuple[str, list[MediaRef]]:
    """The prompt text (with `<image>` placeholders) and its media, in order (a user turn's media where its text's
    `<image>`s place them, when it is written as lm-evaluation-harness writes image prompts: `media_placed_in_text`);
    APIError (400) for a conversation the format cannot write, or whose text holds one of the `control` tokens
    (`control_tokens`; a system or user turn may hold the model's reference tokens, naming images shown before them:
    `ChatFormat.unshown_reference`)."""
    if messages[-1].role != "user":
        raise APIError(400, "the last message must be the user's: the model answers after it", param="messages")
    control = control or {}
    refused = {role: fmt.refused(control, role) for role in ("system", "user", "assistant")}
    turns: list[Turn] = []
    media: list[MediaRef] = []
    for i, message in enumerate(messages):
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) \
            else media_placed_in_text(message.content, i) if message.role == "user" else message.content
        if message.role != "user" and any(not isinstance(p, TextPart) for p in parts):
            article = "an" if message.role == "assistant" else "a"
            raise APIError(400, f"messages[{i}]: {article} {message.role} turn holds text only", param="messages")
        pieces: list[str] = []
        for part in parts:
            if isinstance(part, TextPart):
                check_text(fmt, refused[message.role], part.text, i, message.role)
                pieces.append(part.text)
            else:
                url = part.image_url.url if isinstance(part, ImagePart) else part.video_url.url
                media.append(MediaRef(url, video=not isinstance(part, ImagePart)))
                pieces.append(MEDIA_TOKEN)
        turns.append(Turn(message.role, tuple(pieces)))
    unshown = fmt.unshown_reference(turns)
    if unshown is not None:
        raise APIError(400, f"messages[{unshown[0]}]: {unshown[1]}", param="messages")
    # the format writes some texts with nothing between them (a turn's text parts in the flamingo and idefics formats;
    # consecutive user or system turns in the flamingo format), so a marker split over two of them would be whole in
    # the prompt: checked on the text as the format writes it (`spelled`), as chat training data is
    prompt = fmt.render(turns)
    joined = fmt.spelled(turns, (*fmt.reserved, *control), rendered=prompt)
    if joined is not None:
        i, token = joined
        what = f" ({control[token]})" if token in control and token not in fmt.reserved else ""
        raise APIError(400, f"messages[{i}]: text may not contain {token}{what}: this message's text and the text "
                            f"before it spell it, as the {fmt.name} format writes them (with nothing between them)",
                       param="messages")
    return prompt, media
