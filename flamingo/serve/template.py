"""Chat messages -> one prompt, in the format the served model was trained on (flamingo/chat.py writes the formats;
docs/serve.md shows them): OpenAI messages become `Turn`s, checked as a request.

- the last message must be the user's: the model answers after it;
- system and assistant turns hold text only; user turns hold text, image and video parts (each medium is the
  prompt's next one, `<image>` in its place);
- text may not contain the format's markers (media come as parts; a raw prompt goes to /v1/completions).
Answers start with the space the format puts back, so chat answers are sent without leading whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chat import ChatFormat, Turn
from ..config import MEDIA_TOKEN
from .protocol import APIError, ImagePart, Message, TextPart


@dataclass(frozen=True)
class MediaRef:
    url: str
    video: bool  # given as a video part (a data URL's MIME type decides too)


def render_messages(fmt: ChatFormat, messages: list[Message]) -> tuple[str, list[MediaRef]]:
    """The prompt text (with `<image>` placeholders) and its media, in order; APIError (400) for a conversation the
    format cannot write."""
    if messages[-1].role != "user":
        raise APIError(400, "the last message must be the user's: the model answers after it", param="messages")
    turns: list[Turn] = []
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
                marker = fmt.first_reserved(part.text)
                if marker is not None:
                    raise APIError(400, f"messages[{i}]: text may not contain {marker}; send images as image_url "
                                        "parts (or a raw prompt to /v1/completions)", param="messages")
                pieces.append(part.text)
            else:
                url = part.image_url.url if isinstance(part, ImagePart) else part.video_url.url
                media.append(MediaRef(url, video=not isinstance(part, ImagePart)))
                pieces.append(MEDIA_TOKEN)
        turns.append(Turn(message.role, tuple(pieces)))
    return fmt.render(turns), media
