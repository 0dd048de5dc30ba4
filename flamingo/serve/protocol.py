"""Request schemas of the OpenAI-compatible endpoints and OpenAI-style error bodies.

Fields are typed strictly (`"max_tokens": "10"` is an error, not 10) and unknown fields are refused, as OpenAI's API
does ("Unrecognized request argument supplied"). A few OpenAI fields this server does not implement are accepted
at their neutral value only (penalties 0, no logprobs), so clients that always send them keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    """An error that becomes an OpenAI-style JSON body with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: StrictStr
    detail: Optional[StrictStr] = None  # accepted and ignored: one resolution per model


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Strict):
    """A video by URL (`data:video/mp4;base64,...`); a video data URL in an `image_url` part works too."""

    type: Literal["video_url"]
    video_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, list[ContentPart]]
    name: Optional[StrictStr] = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Sampling(_Strict):
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    temperature: Number = Field(default=1.0, ge=0, le=2)
    top_p: Number = Field(default=1.0, gt=0, le=1)
    n: StrictInt = Field(default=1, ge=1, le=16)
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[StrictStr] = None
    # OpenAI fields not implemented: accepted at their neutral values only
    frequency_penalty: Optional[Number] = Field(default=None, ge=0, le=0)
    presence_penalty: Optional[Number] = Field(default=None, ge=0, le=0)
    logprobs: Optional[Union[StrictBool, StrictInt]] = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop")
        return tuple(stops)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    """A raw Flamingo prompt: text with one `<image>` per entry of `media` (URLs as in chat image parts)."""

    prompt: StrictStr
    media: list[StrictStr] = Field(default_factory=list)
    echo: StrictBool = False


def parse(model: type[_Strict], payload: Any) -> Any:
    """`payload` (decoded JSON) as `model`, or an APIError naming the first bad field."""
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not isinstance(p, str) or p not in _UNION_TAGS)
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {where}", param=where) from None
        raise APIError(400, f"invalid value for {where or 'the body'}: {first['msg']}", param=where or None) from None
    if getattr(request, "logprobs", None):
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    if getattr(request, "echo", False):
        raise APIError(400, "echo is not supported by this server", param="echo")
    return request


# pydantic names the branch of a union in an error's location; people need only the field
_UNION_TAGS = {"str", "list[str]", "list[tagged-union[TextPart,ImagePart,VideoPart]]", "text", "image_url",
               "video_url", "int", "float", "none", "bool"}
