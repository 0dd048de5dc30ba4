"""Request schemas of the OpenAI-compatible endpoints and OpenAI-style error bodies.

Fields are typed strictly (`"max_tokens": "10"` is an error, not 10) and unknown fields are refused, as OpenAI's API
does ("Unrecognized request argument supplied"). Ranges are OpenAI's: penalties in [-2, 2], `logit_bias` at most 300
token ids with biases in [-100, 100], chat `top_logprobs` up to 20 (with `logprobs: true`), completions `logprobs` up
to 5; `max_tokens: 0` only with the completions API's `echo` (the prompt's log-probabilities alone, as
evaluation harnesses ask for them). `stop` takes up to MAX_STOPS non-empty strings, a superset of OpenAI's 4 (as
vLLM takes more: evaluation harnesses send a task's stop strings and EOS). A field given `null` takes its default, as
OpenAI's nullable fields do (`"temperature": null` is 1); a required field given `null` is refused.

OpenAI's fields of features this server has not (tools, audio, an assistant's refusal, ...) are declared, so that what
asks for none of them (null, `[]`, `tool_choice: "none"`: a client that sends every field, or a reply sent back as the
client dumps it) is taken, and what asks for one is refused as not supported here, rather than as unknown; fields that
change nothing here (`store`, `metadata`, `service_tier`, `prompt_cache_key`, ...) are taken and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

Number = StrictFloat  # an int or a float (strict mode takes an int for a float; a bool or a string is refused)
# stop strings a request may carry: a superset of OpenAI's 4, so that lm-evaluation-harness's `until` strings plus the
# EOS it appends fit (its 4-string tasks send 5); the engine scans each once per token (`find_stop`)
MAX_STOPS = 16
TOOLS = "tools are not supported by this server"


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

    def response_headers(self) -> dict[str, str]:
        return final_answer_headers(self.status) | self.headers


# answers a retry would only repeat (the request itself is at fault); 429, 503 and other 5xx may pass
FINAL_STATUSES = frozenset({400, 401, 403, 404, 405, 409, 413, 415, 422})


def final_answer_headers(status: int) -> dict[str, str]:
    """`x-should-retry: false` on a final answer: the openai clients retry a 409 (and 408, 429, 5xx) unless told not
    to."""
    return {"x-should-retry": "false"} if status in FINAL_STATUSES else {}


def refuse_encoded_body(headers: Mapping[str, str]) -> None:
    """A 415 for a request body with a `Content-Encoding`: bodies are read as sent, so compressed bytes would read as
    broken JSON or multipart (or, mislabelled, be taken as they are)."""
    coding = headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise APIError(415, f"Content-Encoding {coding!r} is not supported: send the body uncompressed",
                       code="unsupported_content_encoding")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """Drop the keys given `null` whose field has a default (OpenAI's nullable fields: some clients send every
        field, null when unset); a required field's `null` stays, and is refused by its type."""
        if not isinstance(data, dict):
            return data
        fields = {f.alias or name: f for name, f in cls.model_fields.items()}
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}

    def check(self) -> None:
        """Checks across fields (an APIError), after the fields' own."""


class ImageURL(StrictModel):
    url: StrictStr
    detail: Optional[StrictStr] = None  # accepted and ignored: one resolution per model


class PromptCacheBreakpoint(StrictModel):
    """OpenAI's mark of a reusable prompt prefix's end: taken and ignored, as the prefix cache reuses any stored prefix
    of whole blocks without being told where (docs/serve.md, "Prefix cache")."""

    mode: Literal["explicit"]
    ttl: Optional[Literal["30m", "12h"]] = None


class _Part(StrictModel):
    prompt_cache_breakpoint: Optional[PromptCacheBreakpoint] = None


class TextPart(_Part):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Part):
    """A video by URL (`data:video/mp4;base64,...`); a video data URL in an `image_url` part works too."""

    type: Literal["video_url"]
    video_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(StrictModel):
    """A chat message; `developer` (OpenAI's newer name for it) is a system message, as in the Responses API. The
    fields of OpenAI's replies are taken as a client sends a reply back (`message.model_dump()` writes each, null when
    unset): `refusal`, `tool_calls`, `function_call` and `audio` only empty (this server answers none of them; tool
    messages are refused too), `annotations` (citations of spans of the text) and `parsed` (what the client's
    `parse`/stream helpers add: the content read by its schema) ignored: the text is the turn."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[ContentPart]]
    name: Optional[StrictStr] = None
    refusal: Optional[StrictStr] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    function_call: Optional[dict[str, Any]] = None
    audio: Optional[dict[str, Any]] = None
    annotations: Optional[list[dict[str, Any]]] = None
    parsed: Optional[Any] = None

    @model_validator(mode="before")
    @classmethod
    def _no_tools_or_audio(cls, data: Any) -> Any:
        """Refuses (as `unsupported`, before the content is read: a tool call's content is null) a tool message, an
        assistant's tool calls, audio or refusal."""
        if not isinstance(data, dict):
            return data
        if data.get("role") in ("tool", "function") or data.get("tool_calls") or data.get("function_call"):
            raise PydanticCustomError("unsupported", f"{TOOLS} (a tool call or a tool's answer)")
        if data.get("audio"):
            raise PydanticCustomError("unsupported", "audio is not supported by this server")
        if data.get("refusal"):
            raise PydanticCustomError("unsupported", "refusal is not supported by this server: send the assistant's "
                                                     "text as its content")
        return data

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, role: str) -> str:
        return "system" if role == "developer" else role


class StreamOptions(StrictModel):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool = False  # taken and ignored: this server pads no stream events


class JSONSchemaFormat(StrictModel):
    name: StrictStr = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: Optional[StrictStr] = None
    strict: Optional[StrictBool] = None  # the schema is always enforced


class ResponseFormat(StrictModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON that follows a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    def spec(self) -> dict[str, Any]:
        if self.type == "json_schema" and self.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs its json_schema",
                           param="response_format")
        out: dict[str, Any] = {"type": self.type}
        if self.type == "json_schema":
            out["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.schema_}
        return out


class PromptCacheOptions(StrictModel):
    """OpenAI's prompt-caching options, taken and ignored but `prewarm`: the prefix cache stores every prompt's
    blocks and keeps them until space runs out (least recently used first), whatever breakpoints or lifetime a
    request asks for; a cache-reuse diagnosis (`comparison_response_id`) has no response kept to compare with."""

    mode: Optional[Literal["implicit", "explicit"]] = None
    ttl: Optional[Literal["30m", "12h"]] = None
    prewarm: Optional[StrictBool] = None  # true asks for no answer: refused (`refuse_unsupported`)
    comparison_response_id: Optional[StrictStr] = None


class _OpenAIFields(StrictModel):
    """OpenAI's fields that change nothing on this server, taken and ignored (validated): nothing is stored (`store`),
    the prefix cache needs no key, breakpoint or lifetime (`prompt_cache_key`, `prompt_cache_retention`,
    `prompt_cache_options`), there is one tier; and the fields of features this server has not (tools, moderation),
    taken when they ask for none (null, `[]`, `tool_choice` "none" or "auto"), refused otherwise
    (`refuse_unsupported`)."""

    store: Optional[StrictBool] = None
    metadata: Optional[dict[StrictStr, StrictStr]] = Field(default=None, max_length=16)
    service_tier: Optional[Literal["auto", "default", "flex", "scale", "priority"]] = None
    prompt_cache_key: Optional[StrictStr] = None
    prompt_cache_retention: Optional[Literal["in_memory", "24h"]] = None
    prompt_cache_options: Optional[PromptCacheOptions] = None
    moderation: Optional[dict[str, Any]] = None  # asks for screening with a moderation model, which this server lacks
    safety_identifier: Optional[StrictStr] = None
    user: Optional[StrictStr] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[StrictBool] = None

    def refuse_unsupported(self) -> None:
        if self.moderation is not None:
            raise APIError(400, "moderation is not supported by this server (it runs no moderation model)",
                           param="moderation")
        if self.prompt_cache_options is not None and self.prompt_cache_options.prewarm:
            raise APIError(400, "prompt_cache_options.prewarm is not supported by this server: it answers every "
                                "request (its prefix cache stores a prompt as it is answered)",
                           param="prompt_cache_options.prewarm")
        if self.tools:
            raise APIError(400, TOOLS, param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError(400, f"{TOOLS} (tool_choice takes \"none\" or \"auto\", which call none)",
                           param="tool_choice")


class _Cached(_OpenAIFields):
    # vLLM's: the prefix and vision cache entries a request makes under a salt are reused only by requests with the
    # same salt (none: the entries every request without one shares)
    cache_salt: Optional[StrictStr] = Field(default=None, min_length=1)


class _Sampling(_Cached):
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    temperature: Number = Field(default=1.0, ge=0, le=2)
    top_p: Number = Field(default=1.0, ge=0, le=1)  # 0: the likeliest token alone (the nucleus keeps one)
    n: StrictInt = Field(default=1, ge=1, le=16)
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[Number] = Field(default=None, ge=-2, le=2)
    presence_penalty: Optional[Number] = Field(default=None, ge=-2, le=2)
    logit_bias: Optional[dict[StrictStr, Number]] = None  # token id (as a string) -> bias
    response_format: Optional[ResponseFormat] = None  # completions too (an extension, as vLLM has)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise APIError(400, f"stop takes at most {MAX_STOPS} non-empty strings", param="stop")
        return tuple(stops)

    def biases(self, vocab: int) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (token id, bias) pairs, each id checked against the model's `vocab` logits."""
        pairs: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            # ASCII digits only: isdigit() takes "²", which int() refuses; int() reads full-width "１２" as 12
            if not (key.strip().isascii() and key.strip().isdecimal()) or int(key) >= vocab:
                raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {vocab - 1})",
                               param="logit_bias")
            if not -100 <= bias <= 100:
                raise APIError(400, f"logit_bias: the bias of token {key} must be in [-100, 100], not {bias}",
                               param="logit_bias")
            pairs[int(key)] = float(bias)
        if len(pairs) > 300:
            raise APIError(400, f"logit_bias takes at most 300 tokens, got {len(pairs)}", param="logit_bias")
        return tuple(pairs.items())


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    verbosity: Optional[Literal["low", "medium", "high"]] = None  # accepted and ignored, as Responses' text.verbosity
    # OpenAI's names for what this server has not: taken null (or text-only `modalities`), refused when set
    functions: Optional[list[Any]] = None  # tools, by their older name
    function_call: Optional[Any] = None
    modalities: Optional[list[Literal["text", "audio"]]] = None
    audio: Optional[dict[str, Any]] = None
    prediction: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[StrictStr] = None
    web_search_options: Optional[dict[str, Any]] = None

    def check(self) -> None:
        self.refuse_unsupported()
        if self.functions:
            raise APIError(400, TOOLS, param="functions")
        if self.function_call not in (None, "none", "auto"):
            raise APIError(400, TOOLS, param="function_call")
        if "audio" in (self.modalities or []):
            raise APIError(400, "audio is not supported by this server: modalities takes [\"text\"]",
                           param="modalities")
        for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
            value = getattr(self, name)
            if value is not None and not (name == "reasoning_effort" and value == "none"):  # "none": no reasoning
                raise APIError(400, f"{name} is not supported by this server", param=name)
        self.top_logprobs_asked()

    def top_logprobs_asked(self) -> Optional[int]:
        """None: no logprobs; k: each token's log-probability and its position's k likeliest tokens."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    """A raw Flamingo prompt: text with one `<image>` per entry of `media` (URLs as in chat image parts); or, as
    OpenAI's API takes them, token ids, or a list of prompts (texts or token id lists), each with the same `media`
    (several continuations of one image prompt scored in one request)."""

    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    media: list[StrictStr] = Field(default_factory=list)
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=5)
    max_tokens: Optional[StrictInt] = Field(default=None, ge=0)
    best_of: Optional[StrictInt] = None  # 1 (OpenAI's default): each choice is its own answer
    suffix: Optional[StrictStr] = None  # insertion: refused unless empty

    def prompts(self, vocab: int) -> list[Union[str, list[int]]]:
        """The request's prompts: texts or token id lists, each id checked against the model's `vocab`."""
        p = self.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise APIError(400, "the prompt list is empty", param="prompt")
        for ids in prompts:
            if not isinstance(ids, str) and any(not 0 <= i < vocab for i in ids):
                raise APIError(400, f"the prompt's token ids must be in [0, {vocab})", param="prompt")
        return prompts

    def check(self) -> None:
        self.refuse_unsupported()
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of other than 1 is not supported by this server: ask for n choices, with "
                                "logprobs to rank them", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix (text to insert before) is not supported by this server", param="suffix")
        self.top_logprobs_asked()

    def top_logprobs_asked(self) -> Optional[int]:
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens: 0 generates nothing: it is allowed with echo only", param="max_tokens")
        return self.logprobs


class InputText(_Part):
    type: Literal["input_text"]
    text: StrictStr


class InputImage(_Part):
    """An image (or a video data URL) by URL; uploaded files (`file_id`) are not kept by this server."""

    type: Literal["input_image"]
    image_url: Optional[StrictStr] = None
    file_id: Optional[StrictStr] = None
    detail: Optional[StrictStr] = None  # accepted and ignored: one resolution per model


class OutputText(StrictModel):
    """An earlier answer's text, as a client replays a conversation's assistant turns (`parsed`, which the client's
    `parse`/stream helpers add, ignored)."""

    type: Literal["output_text"]
    text: StrictStr
    annotations: list[Any] = Field(default_factory=list)
    logprobs: Optional[list[Any]] = None
    parsed: Optional[Any] = None


InputPart = Annotated[Union[InputText, InputImage, OutputText], Field(discriminator="type")]


class InputMessage(StrictModel):
    """One item of a Responses `input`: a message (`developer` is a system message)."""

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[InputPart]]
    # what an output item sent back holds (`item.model_dump()`): accepted and ignored
    id: Optional[StrictStr] = None
    status: Optional[StrictStr] = None
    phase: Optional[Literal["commentary", "final_answer"]] = None


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[StrictStr] = Field(default=None, min_length=1, max_length=64)
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    description: Optional[StrictStr] = None
    strict: Optional[StrictBool] = None  # the schema is always enforced


class TextConfig(StrictModel):
    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None  # accepted and ignored


class BackgroundOptions(StrictModel):
    """Options of background execution (`background: true`, refused): they tune nothing a foreground answer does."""

    completion_window: Optional[Literal["soonest", "2h", "8h"]] = None
    continuation_id: Optional[StrictStr] = None


class AccessPrograms(StrictModel):
    """Which of OpenAI's access programs (policies per domain) serves the request: this server has none, so every
    request gets its one model as it is."""

    cyber: Optional[Literal["standard", "daybreak_blue", "daybreak_red"]] = None


class ImageOptions(StrictModel):
    """Image context compression: this server has none, so "auto" and "disabled" are what it does and "enabled" (which
    requires it) is refused."""

    context_compression: Optional[Literal["auto", "enabled", "disabled"]] = None


class ResponsesRequest(_Cached):
    """OpenAI's Responses API (`/v1/responses`), stateless: the whole conversation comes in `input` (a text, or
    messages with `input_text` / `input_image` parts); no tools, no stored responses to continue from."""

    model: Optional[StrictStr] = None
    input: Union[StrictStr, list[InputMessage]]
    instructions: Optional[StrictStr] = None
    max_output_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    temperature: Number = Field(default=1.0, ge=0, le=2)
    top_p: Number = Field(default=1.0, ge=0, le=1)  # 0: the likeliest token alone (the nucleus keeps one)
    stream: StrictBool = False
    text: Optional[TextConfig] = None
    truncation: Optional[Literal["disabled"]] = None
    previous_response_id: Optional[StrictStr] = None
    # OpenAI's fields of features this server lacks: taken when they ask for none (null, [], false, 0)
    conversation: Optional[Any] = None
    prompt: Optional[Any] = None
    reasoning: Optional[Any] = None
    background: Optional[StrictBool] = None
    include: Optional[list[StrictStr]] = None
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    max_tool_calls: Optional[StrictInt] = Field(default=None, ge=0)
    stream_options: Optional[StreamOptions] = None
    context_management: Optional[list[dict[str, Any]]] = None  # compaction of a long context: none here
    image: Optional[ImageOptions] = None
    # taken and ignored
    background_options: Optional[BackgroundOptions] = None
    access_programs: Optional[AccessPrograms] = None

    def check(self) -> None:
        if self.previous_response_id is not None or self.conversation is not None:
            raise APIError(400, "this server keeps no responses or conversations: send the whole conversation in "
                                "`input`",
                           param="previous_response_id" if self.conversation is None else "conversation")
        # `{"effort": "none"}` asks for no reasoning, as this server does none
        no_reasoning = isinstance(self.reasoning, dict) and self.reasoning.get("effort") == "none" and \
            all(v is None for k, v in self.reasoning.items() if k != "effort")
        unsupported = {"prompt": self.prompt is not None, "reasoning": self.reasoning is not None and not no_reasoning,
                       "background": bool(self.background), "include": bool(self.include),
                       "top_logprobs": bool(self.top_logprobs)}
        for name, asked in unsupported.items():
            if asked:
                raise APIError(400, f"{name} is not supported by this server's Responses API", param=name)
        if self.context_management:
            raise APIError(400, "context_management is not supported by this server: it compacts no context (a "
                                "conversation longer than the model's positions is a 400)", param="context_management")
        if self.image is not None and self.image.context_compression == "enabled":
            raise APIError(400, "image.context_compression \"enabled\" is not supported by this server: it "
                                "compresses no image context (\"auto\" and \"disabled\" are taken)",
                           param="image.context_compression")
        self.refuse_unsupported()
        if isinstance(self.input, list) and not self.input:
            raise APIError(400, "input is empty", param="input")
        for i, item in enumerate(self.input if isinstance(self.input, list) else []):
            for part in item.content if isinstance(item.content, list) else []:
                if isinstance(part, InputImage) and part.image_url is None:
                    raise APIError(400, f"input[{i}]: an input_image needs its image_url (a data URL, a path under "
                                        "the server's media root or an allowed http(s) URL); files are not kept here",
                                   param="input")

    def chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion: `instructions` first as a system message, parts as chat parts."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            role = "system" if item.role == "developer" else item.role
            if isinstance(item.content, str):
                messages.append({"role": role, "content": item.content})
                continue
            parts: list[dict[str, Any]] = []
            for part in item.content:
                if isinstance(part, InputImage):
                    parts.append({"type": "image_url", "image_url": {"url": part.image_url}})
                else:
                    parts.append({"type": "text", "text": part.text})
            messages.append({"role": role, "content": parts})
        fmt = self.text.format if self.text is not None else None
        response_format = None
        if fmt is not None:
            if fmt.type == "json_schema" and (fmt.schema_ is None or fmt.name is None):
                raise APIError(400, "text.format of type json_schema needs its name and schema", param="text.format")
            response_format = {"type": fmt.type}
            if fmt.type == "json_schema":
                response_format["json_schema"] = {"name": fmt.name, "schema": fmt.schema_}
        return parse(ChatCompletionRequest, {"messages": messages, "max_tokens": self.max_output_tokens,
                                             "temperature": self.temperature, "top_p": self.top_p,
                                             "response_format": response_format, "cache_salt": self.cache_salt})


class TokenizeRequest(StrictModel):
    """vLLM's `/tokenize`: a raw prompt or chat messages (media are not fetched: each is its `<image>` token)."""

    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[Message]] = Field(default=None, min_length=1)
    add_special_tokens: StrictBool = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")


class DetokenizeRequest(StrictModel):
    model: Optional[StrictStr] = None
    tokens: list[StrictInt]


def parse(model: type[StrictModel], payload: Any) -> Any:
    """`payload` (decoded JSON) as `model`, or an APIError naming the first bad field."""
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(payload)
    except ValidationError as e:
        loc, message, kind = _reported(e.errors())
        where = _field(loc)
        if kind == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {where}", param=where) from None
        if kind == "unsupported":
            raise APIError(400, f"{where}: {message}", param=where) from None
        raise APIError(400, f"invalid value for {where or 'the body'}: {message}", param=where or None) from None
    request.check()
    return request


# pydantic names the branch of a union in an error's location (`content.str`, `content.list[...]`), and the tag of a
# tagged union's member after its list index (`content.0.image_url`); people need only the fields
_BRANCHES = {"str", "list[str]", "list[int]", "list[list[int]]", "list[tagged-union[TextPart,ImagePart,VideoPart]]",
             "int", "float", "none", "bool", "list[InputMessage]",
             "list[tagged-union[InputText,InputImage,OutputText]]"}
_TAGS = {"text", "image_url", "video_url", "input_text", "input_image", "output_text"}


def _reported(errors: list[Any]) -> tuple[tuple[Any, ...], str, str]:
    """The error a request is told: (location, message, pydantic's type). pydantic lists a union's branches in
    order, so the first error of `content: [<a bad part>]` is the `str` branch's "Input should be a valid string";
    while the error at hand is such a branch's type mismatch, the first error inside another branch of that field is
    told instead (the branch the value's shape chose), else the branches' mismatches together ("a valid string or a
    valid list")."""
    chosen = errors[0]
    while True:
        loc = tuple(chosen["loc"])
        if not (loc and loc[-1] in _BRANCHES and chosen["type"].endswith("_type")):
            return loc, _message(chosen), chosen["type"]
        same = [x for x in errors if tuple(x["loc"][:len(loc) - 1]) == loc[:-1]]
        inside = [x for x in same if len(x["loc"]) > len(loc)]
        if not inside:
            wants = dict.fromkeys(x["msg"].removeprefix("Input should be ") for x in same if len(x["loc"]) == len(loc))
            return loc, "Input should be " + " or ".join(wants), chosen["type"]
        chosen = inside[0]


def _message(error: Any) -> str:
    """pydantic's message, in the request's terms where it speaks of Python (classes, discriminators)."""
    ctx = error.get("ctx") or {}
    if error["type"] == "model_type":
        return "Input should be a JSON object"
    if error["type"] == "union_tag_invalid":
        return f"unknown type {ctx.get('tag')!r} (expected one of {ctx.get('expected_tags')})"
    if error["type"] == "union_tag_not_found":
        return f"the {ctx.get('discriminator', 'type')} field is missing"
    return error["msg"]


def _field(loc: tuple[Any, ...]) -> str:
    """An error's location as the request's field path: `messages.0.content.0.image_url.foo`."""
    kept = [str(p) for i, p in enumerate(loc)
            if not (p in _BRANCHES or (p in _TAGS and i > 0 and isinstance(loc[i - 1], int)))]
    return ".".join(kept)
