"""Chat messages -> one Flamingo prompt: the server's one template (docs/serve.md shows it with examples).

- `system` and `user` content goes in as it is, in order: each text part's text, `<image>` for each image or video
  part (the medium is the prompt's next one);
- an `assistant` turn is a demo answer: a space (unless the text before it ends in whitespace or the answer starts
  with it), its text, then `<|endofchunk|>`;
- the last message must be the user's: the model continues right after it.

So the few-shot prompt `<image>Output: a cat.<|endofchunk|><image>Output:` is the conversation
user [image, "Output:"], assistant "a cat.", user [image, "Output:"]. The model's answer starts with the space the
template would put back, so chat answers are sent without leading whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from .protocol import APIError, ImagePart, Message, TextPart


@dataclass(frozen=True)
class MediaRef:
    url: str
    video: bool  # given as a video part (a data URL's MIME type decides too)


def chat_prompt(messages: list[Message]) -> tuple[str, list[MediaRef]]:
    """The prompt text (with `<image>` placeholders) and its media, in order."""
    if messages[-1].role != "user":
        raise APIError(400, "the last message must be the user's: the model answers after it", param="messages")
    text: list[str] = []
    media: list[MediaRef] = []
    for i, message in enumerate(messages):
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) \
            else message.content
        if message.role == "assistant":
            if any(not isinstance(p, TextPart) for p in parts):
                raise APIError(400, f"messages[{i}]: an assistant turn holds text only", param="messages")
            answer = "".join(_checked(p.text, i) for p in parts)
            before = "".join(text)
            space = "" if not before or before[-1].isspace() or answer[:1].isspace() else " "
            text.append(space + answer + END_OF_CHUNK_TOKEN)
            continue
        for part in parts:
            if isinstance(part, TextPart):
                text.append(_checked(part.text, i))
            else:
                if message.role == "system":
                    raise APIError(400, f"messages[{i}]: a system message holds text only", param="messages")
                url = part.image_url.url if isinstance(part, ImagePart) else part.video_url.url
                media.append(MediaRef(url, video=not isinstance(part, ImagePart)))
                text.append(MEDIA_TOKEN)
    return "".join(text), media


def _checked(text: str, i: int) -> str:
    for token in (MEDIA_TOKEN, END_OF_CHUNK_TOKEN):
        if token in text:
            raise APIError(400, f"messages[{i}]: text may not contain {token}; send images as image_url parts "
                                "(or a raw prompt to /v1/completions)", param="messages")
    return text
