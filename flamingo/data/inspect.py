"""`flamingo data inspect`: read a dataset like the loader does, report counts and draw a contact sheet.

Counts: records read, samples kept (documents / pairs), media, frames, tokens (with a tokenizer), skips by reason.
The contact sheet shows the first few kept samples: their media (first frames) and their training text.
Without a kind, `detect_kind` tells it from the first records (the formats are in docs/data.md).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from PIL import Image, ImageDraw

from ..processing import FlamingoProcessor
from .errors import SkipSample, merge_counts
from .kinds import KINDS, resolve_options
from .sequence import example_ids_truncated
from .sources import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    RawRecord,
    close_open_shards,
    expand_path,
    parse_json_record,
    read_records,
)
from .spec import DatasetSpec, remote_fetcher

DETECT_RECORDS = 50  # records read to tell a dataset's kind


@dataclass
class InspectReport:
    kind: str
    files: int
    records: int = 0
    samples: int = 0
    media: int = 0
    frames: int = 0
    tokens: Optional[int] = None  # None without a tokenizer
    truncated: Optional[int] = None  # samples cut by the kind's max_tokens (None without a tokenizer)
    skipped: dict[str, int] = field(default_factory=dict)
    first_skip: dict[str, str] = field(default_factory=dict)  # reason -> why its first sample was skipped
    shown: list[tuple[str, list[list[Image.Image]]]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "files": self.files, "records": self.records, "samples": self.samples,
                "media": self.media, "frames": self.frames, "tokens": self.tokens, "truncated": self.truncated,
                "skipped": self.skipped, "first_skip": self.first_skip}

    def table(self) -> str:
        rows = [("files", self.files), ("records", self.records),
                ({"interleaved": "documents", "chat": "conversations"}.get(self.kind, "pairs"), self.samples),
                ("images" if self.kind != "video" else "videos", self.media), ("frames", self.frames),
                ("tokens", "n/a (no --tokenizer-from)" if self.tokens is None else self.tokens)]
        if self.truncated is not None:
            rows.append(("cut by max_tokens", self.truncated))
        rows += [(f"skipped: {reason}", f"{n}" + (f" (the first: {self.first_skip[reason][:200]})"
                                                  if self.first_skip.get(reason) else ""))
                 for reason, n in self.skipped.items()]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def record_kinds(record: RawRecord) -> set[str]:
    """The kinds one raw record fits: a document (`text_list`) is interleaved; a conversation (`messages` or
    `conversations`) is chat; a row naming a `video`, an `image` or declared `images`, or a tar group with a video or
    an image member and its caption (`.txt` / `.json`), is video or pairs. A tar group of images alone (a document's
    images) and an unreadable record fit none."""
    if record.lost is not None:
        return set()
    try:
        if record.shard is None:
            row = record.payload if isinstance(record.payload, dict) else parse_json_record(record.payload, record.key)
            if "messages" in row or "conversations" in row:
                return {"chat"}
            fields = {"interleaved": "text_list", "video": "video", "pairs": "image"}
            kinds = {kind for kind, name in fields.items() if row.get(name)}
            return kinds | {"pairs"} if row.get("images") else kinds
        members = record.payload
        if "json" in members:
            row = parse_json_record(record.shard.read(members["json"]), record.key)
            if "text_list" in row:
                return {"interleaved"}
            if "messages" in row or "conversations" in row:
                return {"chat"}
    except SkipSample:
        return set()
    if "txt" not in members and "json" not in members:
        return set()
    return {kind for kind, exts in (("video", VIDEO_EXTS), ("pairs", IMAGE_EXTS)) if any(e in members for e in exts)}


def detect_kind(path: str, records: int = DETECT_RECORDS, options: Optional[dict[str, Any]] = None) -> str:
    """The dataset kind of `path`, told from its first `records` raw records (`record_kinds`); a ValueError naming
    the kinds it could not tell apart (or that it found none) otherwise. `options`: the dataset's, for where remote
    shards are fetched to (`remote_cache_dir`, `remote_cache_gb`; the others are read once the kind is known)."""
    seen: set[str] = set()
    read = 0
    files = expand_path(path)
    remote = {k: v for k, v in (options or {}).items() if k in ("remote_cache_dir", "remote_cache_gb")}
    fetcher = remote_fetcher(files, resolve_options("pairs", remote))  # options every kind shares
    try:
        for file in files:
            for record in read_records(file, fetcher=fetcher):
                seen |= record_kinds(record)
                read += 1
                if read >= records:
                    break
            if read >= records:
                break
    finally:
        close_open_shards()
    if len(seen) == 1:
        return seen.pop()
    found = (f"its records fit {' and '.join(sorted(seen))} alike" if seen else
             f"its first {read} record(s) fit none of {', '.join(KINDS)} (docs/data.md has the formats)")
    raise ValueError(f"cannot tell the kind of dataset {path!r}: {found}; pass --kind "
                     f"{'|'.join(sorted(seen) or KINDS)}")


def inspect_dataset(path: str, kind: Optional[str] = None, processor: Optional[FlamingoProcessor] = None, *,
                    options: Optional[dict[str, Any]] = None, limit: Optional[int] = None,
                    show: int = 6) -> InspectReport:
    """Read every record (or the first `limit`, opening no file after the one that holds the last) in file order;
    media are decoded to count frames and spot bad ones. `kind` None: `detect_kind(path)`."""
    kind = kind or detect_kind(path, options=options)
    spec = DatasetSpec.create("inspect", kind, path, 1, options, processor)
    report = InspectReport(kind, len(spec.files), tokens=0 if processor is not None else None)
    skipped: Counter[str] = Counter()
    try:
        for record in _records(spec, limit):
            report.records += 1
            try:
                _count_sample(spec, record, report, show)
            except SkipSample as e:
                skipped[e.reason] += 1
                report.first_skip.setdefault(e.reason, e.detail)
    finally:
        close_open_shards()
    report.skipped = merge_counts([skipped])
    return report


def _records(spec: DatasetSpec, limit: Optional[int]) -> Iterator[RawRecord]:
    """The first `limit` (None: all) raw records of `spec`'s files: a file after the last of them is never opened
    (a remote shard never fetched)."""
    read = 0
    for file in spec.files:
        if limit is not None and read >= limit:
            return
        for record in read_records(file, spec.tar_needs, spec.fetcher):
            yield record
            read += 1
            if limit is not None and read >= limit:
                return


def _count_sample(spec: DatasetSpec, record: RawRecord, report: InspectReport, show: int) -> None:
    """Count one record's sample into `report` (and keep it to show while fewer than `show` are); SkipSample when
    it is skipped."""
    o, processor = spec.options, spec.processor
    record.check()
    example = spec.example(record)
    n_media = len(example.media)
    if processor is not None:
        ids, _, cut = example_ids_truncated(processor, example, int(o["max_tokens"]))
        n_media = ids.count(processor.media_token_id)
        if n_media == 0 and not (o.get("text_only") and not example.media):
            raise SkipSample("no_matched_image", "nothing left within max_tokens")
    media = [ref.load(fps=spec.fps, max_frames=spec.max_frames) for ref in example.media[:n_media]]
    report.samples += 1
    report.media += len(media)
    report.frames += sum(len(m) for m in media)
    if processor is not None:
        report.tokens = (report.tokens or 0) + len(ids)
        report.truncated = (report.truncated or 0) + int(cut)
    if len(report.shown) < show:
        text = processor.tokenizer.decode(ids) if processor is not None else example.text
        report.shown.append((f"{record.key}: {text}", media))


def sheet_labels(report: InspectReport, thumb: int = 96) -> list[str]:
    """The text the contact sheet draws: per shown sample, its key and training text wrapped to 80 columns and cut to
    the lines beside a `thumb`-pixel row; with none shown, one notice, which tells a dataset without good samples
    from a run that drew none of its good ones (`--show 0`)."""
    if not report.shown:
        return [f"none of the {report.samples} good samples drawn (--show 0)" if report.samples
                else "no good samples"]
    return ["\n".join(textwrap.wrap(text, 80)[: thumb // 12]) for text, _ in report.shown]


def contact_sheet(report: InspectReport, path: str, thumb: int = 96, per_row: int = 6) -> str:
    """One row per shown sample: up to `per_row` thumbnails (each medium's first frames), then its text
    (`sheet_labels`)."""
    text_width = 520
    rows = max(1, len(report.shown))
    sheet = Image.new("RGB", (per_row * (thumb + 4) + text_width, rows * (thumb + 8) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    labels = sheet_labels(report, thumb)
    for r, ((_, media), label) in enumerate(zip(report.shown, labels)):
        y = 4 + r * (thumb + 8)
        frames = [f for medium in media for f in medium[: max(1, per_row // max(1, len(media)))]][:per_row]
        for c, frame in enumerate(frames):
            sheet.paste(frame.resize((thumb, thumb)), (4 + c * (thumb + 4), y))
        draw.multiline_text((per_row * (thumb + 4) + 4, y), label, fill="black")
    if not report.shown:  # none good, or none asked for (`--show 0`)
        draw.text((4, 4), labels[0], fill="red")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return path


def write_report(report: InspectReport, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    summary = os.path.join(out_dir, "summary.json")
    with open(summary, "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    return {"summary": summary, "contact_sheet": contact_sheet(report, os.path.join(out_dir, "contact_sheet.png"))}
