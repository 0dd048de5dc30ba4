"""Image–text and video–text pairs -> `Example`s: `<image>{caption}<|endofchunk|>` (+ EOS), one medium each.

Tables (CSV / JSONL / JSON list) name the medium by a path relative to the table's directory (`image` or `video`
field) next to `caption`; tar shards hold `{key}.{ext}`, an image (`sources.IMAGE_EXTS`: jpg, png, webp, gif, bmp,
tiff, ...) or a video (`sources.VIDEO_EXTS`: mp4, webm, mkv, mov, avi, ...), with `{key}.txt` or `{key}.json`
(`{"caption": ...}`).

A JSONL/JSON row may instead hold several images (`images`: a list of paths) and a caption that declares each of
them MMICL-style (`Image 0 is <image0>. Image 1 is <image1>. ...`, flamingo/references.py) where it goes, and may
refer back to them (`<image0>`): `{caption with the declarations as <image>}<|endofchunk|>` (+ EOS). As the
processor refuses such a prompt, a row is skipped (`bad_record`) when the model has no reference token for one of
its images (`FlamingoConfig.num_image_references`; checked when it is encoded, `sequence.check_references`).
"""

from __future__ import annotations

from typing import Any

from ..config import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from ..references import resolve_declarations
from .errors import SkipSample
from .sequence import Example, clean_text
from .sources import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    MediaRef,
    RawRecord,
    caption_text,
    file_ref,
    member_ref,
    parse_json_record,
    resolve_relative,
)


def pair_text(caption: str, eos: str = "") -> str:
    return f"{MEDIA_TOKEN}{caption}{END_OF_CHUNK_TOKEN}{eos}"


def _caption_of(row: dict[str, Any], where: str) -> str:
    caption = row.get("caption", row.get("text"))
    if caption is None:
        raise SkipSample("bad_record", f"{where}: no 'caption' field")
    if not isinstance(caption, str):
        raise SkipSample("bad_record", f"{where}: caption must be a string, got {type(caption).__name__}")
    caption = clean_text(caption)
    if not caption:
        raise SkipSample("empty_text", f"{where}: empty caption")
    return caption


def _from_tar(record: RawRecord, video: bool) -> tuple[MediaRef, str]:
    shard, members = record.shard, record.payload
    assert shard is not None
    exts = VIDEO_EXTS if video else IMAGE_EXTS
    ext = next((e for e in exts if e in members), None)
    if "txt" in members:
        caption = _caption_of({"caption": caption_text(shard.read(members["txt"]), record.key)}, record.key)
    elif "json" in members:
        caption = _caption_of(parse_json_record(shard.read(members["json"]), record.key), record.key)
    else:
        raise SkipSample("bad_record", f"{record.key}: tar sample has neither .txt nor .json")
    if ext is None:
        raise SkipSample("missing_file", f"{record.key}: tar sample has no {'|'.join(exts)} member "
                                         f"(members: {sorted(members)})")
    return member_ref(shard, members[ext], video), caption


def _from_table(record: RawRecord, row: dict[str, Any], video: bool) -> tuple[MediaRef, str]:
    field = "video" if video else "image"
    rel = row.get(field)
    if not isinstance(rel, str) or not rel.strip():
        raise SkipSample("bad_record", f"{record.key}: no {field!r} path")
    caption = _caption_of(row, record.key)
    return file_ref(resolve_relative(record.base_dir, rel.strip()), video), caption


def _declared_images(record: RawRecord, row: dict[str, Any], eos: str) -> Example:
    """A row with `images` and a caption declaring them -> an `Example` with those images in declaration order."""
    paths = row["images"]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        raise SkipSample("bad_record", f"{record.key}: 'images' must be a non-empty list of paths")
    caption = _caption_of(row, record.key)
    try:  # checked against the row's own images here; against the model's reference tokens when it is encoded
        text = resolve_declarations(caption, len(paths), len(paths))
    except ValueError as e:
        raise SkipSample("bad_record", f"{record.key}: {e}") from e
    refs = [file_ref(resolve_relative(record.base_dir, p.strip())) for p in paths]
    return Example(record.key, f"{text}{END_OF_CHUNK_TOKEN}{eos}", refs, declared_images=len(paths))


def pair_example(record: RawRecord, *, video: bool = False, eos: str = "") -> Example:
    """One pair record -> an `Example` with one medium (an image, or a video decoded later), or with the images of
    a row that declares several (`images`)."""
    if record.shard is not None:
        ref, caption = _from_tar(record, video)
    else:
        row = record.payload if isinstance(record.payload, dict) else parse_json_record(record.payload, record.key)
        if "images" in row and not video:
            return _declared_images(record, row, eos)
        ref, caption = _from_table(record, row, video)
    return Example(record.key, pair_text(caption, eos), [ref])
