"""Conversations (visual instruction tuning) -> `Example`s in the model's chat format, trained on the answers only.

A record (a JSONL / JSON row, or a tar sample's `.json` with its image or video member) holds either
- `messages`: OpenAI chat messages, `role` system | user | assistant and `content` a string or a list of parts:
  `{"type": "text", "text": ...}`, `{"type": "image", "image": PATH}` or `{"type": "image_url", "image_url":
  {"url": PATH}}`, `{"type": "video", "video": PATH}` or `{"type": "video_url", "video_url": {"url": PATH}}`; or
- `conversations` (LLaVA's format): `{"from": "human" | "gpt" | "system", "value": ...}` turns and the row's `image`
  (a path or a list of paths) or `video`, each medium at the next `<image>` placeholder of the human turns
  (LLaVA writes `<image>\\n` first; a `video` row's `<video>`, as Video-LLaVA's and Video-ChatGPT's write it, is one
  too); with no placeholder at all, the media go before the first human turn's text. The `developer` role is
  `system`, as the server reads it.
Paths are relative to the table's directory; in a tar shard they name members (`flamingo data pack --kind chat`
writes them so), and a medium whose path is no member (or that has none) is the sample's own image (or video) member
(`{key}.jpg` beside `{key}.json`, the WebDataset layout of LLaVA-style data, whose JSON may keep the original path)
when the record names exactly one medium; otherwise such a path is `missing_file`. A medium may also be inline, a
`data:image/...;base64,...` URL (as OpenAI's fine-tuning rows carry images); an `http(s)` URL is never fetched: it is
`missing_file`, with a message saying to download the media.
The conversation is written in the format of the processor's template (flamingo/chat.py: what `flamingo serve`
writes for the same messages), and trained on its answers only: what follows each served prompt, the assistant
turn's gap (the space before it: a token of its own where the tokenizer writes `▁`, `2` for ` 2`), text and end
marker (`<|endofchunk|>`, `<end_of_utterance>`) are labelled, the questions and the format's answer prefixes are not
(`Example.trained_spans`). Turns after the last answer are dropped with their media (nothing there is learned).

A conversation without any medium is skipped (`no_matched_image`: Flamingo's samples hold an image) unless the
source's `text_only` option keeps it: language-only instruction data, which trains the LM's adapters (`lm_lora`) and,
under Flamingo's rule, the blocks' dense layers; a model with `imageless_rows_skip_blocks` (Multimodal-GPT's) runs
such rows through its LM alone, as it trained them.

Skipped and counted: a conversation without an answer (`empty_text`); a format marker (or `<|endofchunk|>`, in every
format) in message text, or spelled by texts the format writes with nothing between them (`a <ima`, `ge> b`), media in
a system or assistant turn, placeholders that do not match the media, unknown
roles or part types, an `<imagek>` the model has no reference token for (`sequence.check_references`), and, on a
model with reference tokens, a system or user turn's `<imagek>` naming an image the conversation has not shown at that
point (`ChatFormat.unshown_reference`: the server refuses that message alike; an assistant turn's references are
trained as written) (all `bad_record`).
"""

from __future__ import annotations

from typing import Any, Optional

from ..chat import ROLES, ChatFormat, Turn, pieces_of
from ..config import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from ..references import reference_token
from ..runtime.data_url import decode_data_url, is_data_url, media_kind
from .errors import SkipSample
from .sequence import Example
from .sources import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    MediaRef,
    RawRecord,
    bytes_ref,
    file_ref,
    member_ref,
    parse_json_record,
    resolve_relative,
)

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
               "system": "system", "developer": "system"}
VIDEO_PLACEHOLDER = "<video>"  # where a video row's video goes (Video-LLaVA, Video-ChatGPT, LLaVA-NeXT-Video)


class _Media:
    """Resolves a record's media: a path relative to its table, or the tar sample's own member. `count`: how many
    media the record names; the sample's own member stands in only for a record that names one (two images named
    by paths that are no members are not one image twice)."""

    def __init__(self, record: RawRecord, count: int) -> None:
        self.record, self.count = record, count

    def ref(self, path: Any, video: bool) -> MediaRef:
        record = self.record
        if path is not None and not isinstance(path, str):
            raise SkipSample("bad_record", f"{record.key}: a media path must be a string")
        path = (path or "").strip()
        if is_data_url(path):  # inline, as OpenAI's fine-tuning rows carry images
            try:
                mime, data = decode_data_url(path)
                kind = media_kind(mime)
            except ValueError as e:
                raise SkipSample("bad_record", f"{record.key}: {e}") from None
            return bytes_ref(data, f"{record.key}: a data URL ({mime})", video or kind == "video")
        if path.partition(":")[0].lower() in ("http", "https"):  # (urlsplit raises on a bad host: `http://[x/a.jpg`)
            raise SkipSample("missing_file", f"{record.key}: {path[:80]!r} is a remote URL; training reads local "
                                             "files and data: URLs, never the network (download the media first)")
        if record.shard is None:
            if not path:
                raise SkipSample("bad_record", f"{record.key}: a medium without a path")
            return file_ref(resolve_relative(record.base_dir, path), video)
        member = record.shard.find(path, record.group) if path else None  # a packed conversation names its members
        if member is None:  # else the sample's own member (WebDataset: `{key}.jpg` beside `{key}.json`, whatever
            exts = VIDEO_EXTS if video else IMAGE_EXTS  # path the JSON kept from the original dataset)
            ext = next((e for e in exts if e in record.payload), None)
            if ext is None or self.count != 1:
                why = (f"the sample has no {'|'.join(exts)} member" if ext is None else
                       f"the record names {self.count} media, so its own {ext} member cannot stand in for them")
                raise SkipSample("missing_file", f"{record.key}: no member {path!r} in {record.file}, and {why}")
            member = record.payload[ext]
        return member_ref(record.shard, member, video)


def _media_count(row: dict[str, Any]) -> int:
    """How many media a record names: its messages' media parts, or LLaVA's `image` / `video` paths (one where it
    names none: a tar sample's own member, if any)."""
    if "messages" in row:
        messages = row["messages"] if isinstance(row["messages"], list) else []
        contents = [m.get("content") for m in messages if isinstance(m, dict)]
        return sum(1 for c in contents if isinstance(c, list) for p in c
                   if isinstance(p, dict) and p.get("type") not in (None, "text"))
    paths = row.get("video") if row.get("video") is not None else row.get("image")
    return len(paths) if isinstance(paths, list) and paths else 1


def _part_media(part: dict[str, Any]) -> Optional[tuple[Any, bool]]:
    """(path, is video) of a media part; None for a text part."""
    kind = part.get("type")
    if kind == "text":
        return None
    if kind in ("image", "video"):
        return part.get(kind), kind == "video"
    if kind in ("image_url", "video_url"):
        value = part.get(kind)
        return (value.get("url") if isinstance(value, dict) else value), kind == "video_url"
    raise ValueError(f"unknown content part type {kind!r}")


def _from_messages(messages: Any, media: _Media, key: str) -> tuple[list[Turn], list[list[MediaRef]]]:
    if not isinstance(messages, list) or not messages:
        raise SkipSample("bad_record", f"{key}: 'messages' must be a non-empty list")
    turns, refs = [], []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        role = "system" if role == "developer" else role  # OpenAI's newer name for it, as the server reads it
        if role not in ROLES:
            raise SkipSample("bad_record", f"{key}: messages[{i}] has role {role!r} (expected one of {ROLES})")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise SkipSample("bad_record", f"{key}: messages[{i}] content must be a string or a list of parts")
        pieces, turn_refs = [], []
        for part in parts:
            try:
                found = _part_media(part)
            except ValueError as e:
                raise SkipSample("bad_record", f"{key}: messages[{i}]: {e}") from e
            if found is None:
                text = part.get("text")
                if not isinstance(text, str):
                    raise SkipSample("bad_record", f"{key}: messages[{i}] has a text part without text")
                pieces.append(text)
            else:
                turn_refs.append(media.ref(*found))
                pieces.append(MEDIA_TOKEN)
        turns.append(Turn(role, tuple(pieces)))
        refs.append(turn_refs)
    return turns, refs


def _from_llava(row: dict[str, Any], media: _Media, key: str) -> tuple[list[Turn], list[list[MediaRef]]]:
    conversations = row["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise SkipSample("bad_record", f"{key}: 'conversations' must be a non-empty list")
    video = row.get("video") is not None
    paths = row.get("video" if video else "image")
    paths = [] if paths is None else paths if isinstance(paths, list) else [paths]
    record = media.record
    exts = VIDEO_EXTS if video else IMAGE_EXTS
    if not paths and record.shard is not None and any(e in record.payload for e in exts):
        paths = [None]  # a tar sample's own image (or video) member; a sample with none is a text conversation
    pending = [media.ref(p, video) for p in paths]
    values = []
    for i, turn in enumerate(conversations):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = LLAVA_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise SkipSample("bad_record", f"{key}: conversations[{i}] needs 'from' (human, gpt or system) and a "
                                           "string 'value'")
        value = turn["value"]
        values.append((role, value.replace(VIDEO_PLACEHOLDER, MEDIA_TOKEN) if video else value))
    placeholders = sum(v.count(MEDIA_TOKEN) for role, v in values if role == "user")
    if placeholders not in (0, len(pending)) or any(MEDIA_TOKEN in v for role, v in values if role != "user"):
        what = "<image> or <video>" if video else "<image>"
        raise SkipSample("bad_record", f"{key}: {placeholders} {what} placeholders in the human turns for "
                                       f"{len(pending)} media")
    turns, refs = [], []
    first_user = next((i for i, (role, _) in enumerate(values) if role == "user"), None)
    for i, (role, value) in enumerate(values):
        if placeholders == 0 and i == first_user:
            value = MEDIA_TOKEN * len(pending) + value
        turns.append(Turn(role, pieces_of(value)))
        refs.append([pending.pop(0) for _ in range(value.count(MEDIA_TOKEN))])
    if pending:
        raise SkipSample("bad_record", f"{key}: {len(pending)} media but no human turn to place them in")
    return turns, refs


def chat_example(record: RawRecord, fmt: ChatFormat, *, eos: str = "") -> Example:
    """One conversation record -> an `Example` written in `fmt`, its answers' character spans to train on."""
    if record.shard is not None:
        members = record.payload
        if "json" not in members:
            raise SkipSample("bad_record", f"{record.key}: tar sample has no .json conversation")
        row = parse_json_record(record.shard.read(members["json"]), record.key)
    else:
        row = record.payload if isinstance(record.payload, dict) else parse_json_record(record.payload, record.key)
    media = _Media(record, _media_count(row))
    if "messages" in row:
        turns, refs = _from_messages(row["messages"], media, record.key)
    elif "conversations" in row:
        turns, refs = _from_llava(row, media, record.key)
    else:
        raise SkipSample("bad_record", f"{record.key}: no 'messages' or 'conversations'")
    last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=None)
    if last is None:
        raise SkipSample("empty_text", f"{record.key}: no assistant answer to train on")
    turns, refs = turns[:last + 1], refs[:last + 1]
    for i, (turn, turn_refs) in enumerate(zip(turns, refs)):
        if turn_refs and turn.role != "user":
            raise SkipSample("bad_record", f"{record.key}: turn {i} ({turn.role}) holds media; only user turns may")
        for piece in turn.pieces:
            marker = fmt.first_reserved(piece) if piece != MEDIA_TOKEN else None
            if marker is not None:
                raise SkipSample("bad_record", f"{record.key}: turn {i} contains {marker}, a marker of the "
                                               f"{fmt.name} format")
            if END_OF_CHUNK_TOKEN in piece:  # every format: a tokenizer without it would train its characters
                raise SkipSample("bad_record", f"{record.key}: turn {i} contains {END_OF_CHUNK_TOKEN}, Flamingo's "
                                               "chunk marker")
    unshown = fmt.unshown_reference(turns)
    if unshown is not None:
        raise SkipSample("bad_record", f"{record.key}: turn {unshown[0]}: {unshown[1]}")
    segments = fmt.segments(turns)
    # text the format writes with nothing between it: checked as written (the prompt the turns render to)
    # (a reference too: one split so would be read unchecked, where the server refuses it)
    references = tuple(reference_token(k) for k in range(fmt.references))
    joined = fmt.spelled(turns, (*fmt.reserved, END_OF_CHUNK_TOKEN, *references), rendered=fmt.prompt_of(segments))
    if joined is not None:
        what = "a reference token" if joined[1] in references else f"a marker of the {fmt.name} format"
        raise SkipSample("bad_record", f"{record.key}: turn {joined[0]} spells {joined[1]}, {what}, with the text "
                                       "the format writes right before it (a marker split over text parts or turns)")
    text, spans = "", []
    for piece, trained in segments:
        if trained:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    if eos and not text.endswith(eos):  # the sequence's end, learned after the last answer (mmgpt's ends with it)
        spans.append((len(text), len(text) + len(eos)))  # a span of its own: each answer's end stays an answer end
        text += eos
    return Example(record.key, text, [r for turn_refs in refs for r in turn_refs], trained_spans=spans)
