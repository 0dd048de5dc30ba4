"""`flamingo data pack`: JSONL / CSV tables (+ their media files) or an image folder -> WebDataset tar shards.

Shards hold `{key}.{jpg,png,...}|{mp4,...}` + `{key}.txt` for pairs and videos, and `{key}.json` (the document) +
`{key}.{i}.{ext}` (its images, `image_name` rewritten to those member names) for interleaved documents, and
`{key}.json` (the conversation, its media paths rewritten) + `{key}.{i}.{ext}` for conversations: the layouts
`flamingo/data` reads. A row is packed only if the loader would read it back: rows whose media are missing or whose
JSON or fields are malformed (by the loader's rules: a pair's caption is `caption`, else `text`) are left out and
counted by the loader's reasons. A pair's image is named by its format where its extension is not one the tar
reader lists (`images/3f2a9c` holding a JPEG becomes `{key}.jpg`), and re-encoded as PNG where its format has no
such extension either. Left out under reasons of their own: MMICL rows declaring several images (`images`,
`multi_image_row`: a pair sample holds one image; keep them in a JSONL table), videos whose extension the tar
reader does not list (`video_extension`), and animations to re-encode of more pixels than the loaders' cap in all
whose frames are too large to encode one by one within its cost, or without PyAV (`reencode_size`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from fractions import Fraction
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from ..processing import check_animation_pixels, default_max_pixels
from ..runtime.checkpoint_io import blocking_file
from ..runtime.data_url import is_data_url
from ..runtime.media_formats import open_image
from ..runtime.text import valid_text
from ..video import TooLong, TooManyPixels, import_av
from .errors import SkipSample, merge_counts
from .sequence import clean_text
from .sources import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    caption_text,
    parse_json_record,
    read_media_file,
    read_records,
    resolve_relative,
)

# PIL's format names whose files the tar reader lists under another extension
FORMAT_EXTS = {"jpeg": "jpg", "mpo": "jpg", "tiff": "tif"}
# An animation re-encoded frame by frame (`_streamed_apng`) costs about 44 bytes per pixel of one frame (FFmpeg's
# APNG encoder keeps the previous frame and its candidate encodings; the decoder and the conversions each hold a
# copy), where Pillow's writer, holding every frame, costs about 11 per pixel in all (an AVIF of 10 frames of a
# quarter of a 20 M cap: +213 MiB; one of the cap's pixels in all through Pillow: +216 MiB). Frames of at most the
# cap over this keep it within what the cap's pixels cost through Pillow's writer.
_STREAMED_FRAME_SHARE = 4
_MS = Fraction(1, 1000)


class Unpackable(Exception):
    """A row the loader reads from a table but no shard layout holds: left out, counted under `reason`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def earlier_shards(pattern: str) -> list[str]:
    """The files that `pattern` (one %d field) names, already there, sorted."""
    mark = "987654321"
    named = pattern % int(mark)
    if named.count(mark) != 1:  # (a %x or %o field: names not checked)
        return []
    head, tail = named.split(mark)
    directory = os.path.dirname(os.path.abspath(named))
    shard = re.compile(re.escape(os.path.basename(head)) + r"\d+" + re.escape(tail))
    if not os.path.isdir(directory) or os.path.dirname(head) != os.path.dirname(named):
        return []
    return sorted(os.path.join(directory, n) for n in os.listdir(directory)
                  if shard.fullmatch(n) and os.path.isfile(os.path.join(directory, n)))


class ShardWriter:
    """Writes members into `pattern % index` tars, starting a new shard every `shard_size` samples."""

    def __init__(self, pattern: str, shard_size: int) -> None:
        """pattern: `--out`, a directory (its shards `shard-%06d.tar`) or a pattern with one integer field; checked
        here, before any row is read: one that formats no shard name, or whose shards' directory cannot be made
        (an existing file, a path through one), is a ValueError naming it."""
        if shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
        out = pattern
        if not os.fspath(out).strip():
            raise ValueError(f"--out {out!r} names nothing: give a directory or a pattern like out/shard-%06d.tar")
        if "%" not in pattern and not pattern.lower().endswith(".tar"):  # a directory (made if need be)
            pattern = os.path.join(pattern, "shard-%06d.tar")
        if "%" not in pattern:
            raise ValueError(f"--out must be a directory or a pattern with a %d field (shard-%06d.tar), "
                             f"got {pattern!r}")
        try:
            first = pattern % 0
        except (TypeError, ValueError) as e:  # `%d-%d`, a lone `%`
            raise ValueError(f"--out {out!r}: a pattern needs exactly one %d field (shard-%06d.tar; %% for a "
                             f"literal %): {e}") from None
        if first == pattern % 1:
            raise ValueError(f"--out {out!r}: a pattern needs exactly one %d field (shard-%06d.tar), which numbers "
                             "the shards: each would replace the last")
        path = blocking_file(os.path.dirname(os.path.abspath(first)))
        if path is not None:
            raise ValueError(f"--out {out!r}: the shards' directory cannot be made, {path!r} is a file")
        earlier = earlier_shards(pattern)
        if earlier:
            names = ", ".join(os.path.basename(p) for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
            raise ValueError(f"--out {out!r} already holds {len(earlier)} shard(s) of an earlier pack ({names}): "
                             "a pack writes its shards in place, so those past the new last one would stay and be "
                             "read as part of the dataset; remove them, or pack into a new directory")
        self.pattern, self.shard_size = pattern, shard_size
        self.paths: list[str] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0

    def write(self, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None or self._count == self.shard_size:
            self.close()
            path = self.pattern % len(self.paths)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._tar = tarfile.open(path, "w")
            self.paths.append(path)
            self._count = 0
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def remove(self) -> None:
        """Close and delete the shards written so far (a pack that did not end, a full disk's included: closing a
        tar writes its end blocks, which may fail too)."""
        if self._tar is not None:
            tar, self._tar = self._tar, None
            with contextlib.suppress(OSError):
                tar.fileobj.close()  # (not tar.close(): nothing more is written)
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def brace_pattern(self) -> str:
        """The dataset `path` to put in a config: `dir/shard-{000000..000009}.tar`."""
        if not self.paths:
            return ""
        first, last = os.path.basename(self.paths[0]), os.path.basename(self.paths[-1])
        if len(self.paths) == 1:
            return self.paths[0]
        i = 0
        while first[i] == last[i]:
            i += 1
        j = 0
        while first[-1 - j] == last[-1 - j]:
            j += 1
        # widen to the whole zero-padded number, at both ends (shard-000000 .. shard-000010 share the suffix `0.tar`)
        while i > 0 and first[i - 1].isdigit():
            i -= 1
        while j > 0 and first[-j].isdigit():
            j -= 1
        lo, hi = first[i:len(first) - j], last[i:len(last) - j]
        return os.path.join(os.path.dirname(self.paths[0]), f"{first[:i]}{{{lo}..{hi}}}{first[len(first) - j:]}")


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lstrip(".").lower() or "bin"


def _image_member(path: str, key: str) -> tuple[str, bytes]:
    """An image file as the member `{key}.{ext}` the tar reader finds: its own extension where listed, else its
    format's, else re-encoded as PNG (an animation as an animated PNG: `_check_reencoded` says how). Bytes PIL cannot
    read are `bad_image`, as the loader would count them from the table; so is an image to re-encode that the loader
    refuses by its size."""
    data = read_media_file(path)
    if _ext(path) in IMAGE_EXTS:
        return f"{key}.{_ext(path)}", data
    try:
        with open_image(io.BytesIO(data)) as image:
            fmt = (image.format or "").lower()
            ext = FORMAT_EXTS.get(fmt, fmt)
            if ext in IMAGE_EXTS:
                return f"{key}.{ext}", data
            if _check_reencoded(image, path):
                return f"{key}.png", _streamed_apng(image)
            out = io.BytesIO()
            image.save(out, format="PNG", save_all=getattr(image, "is_animated", False))
            return f"{key}.png", out.getvalue()
    except Unpackable:
        raise
    except TooLong as e:  # an animation of more frames x canvas than the loader reads
        raise SkipSample("bad_image", f"{path}: an animation {e}") from e
    except Exception as e:  # PIL raises several types for unreadable files
        raise SkipSample("bad_image", f"{path}: {e}") from e


def _check_reencoded(image: Image.Image, path: str) -> bool:
    """An image to re-encode, by its header before any frame is decoded -> whether to re-encode it frame by frame.

    Refused as the loader refuses them (`TooManyPixels`): a frame over `default_max_pixels` and an animation of more
    frames x canvas than `check_animation_pixels` allows. Pillow's PNG writer holds every frame (a 15 KB AVIF of 20
    4000x4000 frames took 1.5 GiB): it writes a still and an animation of at most the cap's pixels in all; a larger
    one is re-encoded frame by frame (`_streamed_apng`, PyAV's), its frames at most the cap over
    `_STREAMED_FRAME_SHARE`, else `Unpackable` (`reencode_size`), as it is without PyAV."""
    cap = default_max_pixels()
    if cap is None:
        return False
    (width, height), frames = image.size, getattr(image, "n_frames", 1)
    if width * height > cap:
        raise TooManyPixels(width, height, 0, cap)
    if frames * width * height <= cap:
        return False
    check_animation_pixels(image, cap)
    why = f"{path}: an animation of {frames} frames of {width}x{height} is more than the {cap} pixels re-encoding holds"
    if _STREAMED_FRAME_SHARE * width * height > cap:
        raise Unpackable("reencode_size", f"{why}, its frames more than 1/{_STREAMED_FRAME_SHARE} of them; give it as "
                                          "PNG, GIF or WebP")
    try:
        import_av()
    except ImportError:
        raise Unpackable("reencode_size", f"{why}; re-encoding it frame by frame needs PyAV: pip install "
                                          "'flamingo-vlm[video]'") from None
    return True


def _streamed_apng(image: Image.Image) -> bytes:
    """An animation -> an animated PNG, each frame encoded as it is decoded (FFmpeg's APNG encoder, by PyAV), each
    shown for its own delay (ms; a frame's is read when it is decoded, as AVIF's are: the last one's first, which the
    muxer needs before any frame). Pixels as RGB, or RGBA where the image has transparency."""
    av = import_av()
    count = image.n_frames
    image.seek(count - 1)
    image.load()
    final = max(round(image.info.get("duration") or 0), 1)  # 0 tells the muxer to repeat the previous delay
    alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    mode, pixel_format = ("RGBA", "rgba") if alpha else ("RGB", "rgb24")
    out = io.BytesIO()
    with av.open(out, "w", format="apng", options={"final_delay": f"{final}/1000"}) as container:
        stream = container.add_stream("apng", rate=1000)
        stream.width, stream.height = image.size
        stream.pix_fmt, stream.time_base = pixel_format, _MS
        start, pts = 0.0, -1  # the frame's start in ms; its timestamp, after the previous one's
        for k in range(count):
            image.seek(k)
            image.load()
            frame = av.VideoFrame.from_ndarray(np.asarray(image.convert(mode)), format=pixel_format)
            pts = max(round(start), pts + 1)  # (a delay under 1 ms becomes 1: the loader shows either for 100 ms)
            frame.pts, frame.time_base = pts, _MS
            start += image.info.get("duration") or 0
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return out.getvalue()


def _pair_members(row: dict[str, Any], base_dir: str, key: str, video: bool) -> list[tuple[str, bytes]]:
    """A pair (or video) row as `{key}.{ext}` + `{key}.txt`, by the loader's rules (data/pairs.py)."""
    field = "video" if video else "image"
    if not video and "images" in row:
        raise Unpackable("multi_image_row", f"{key}: a pair sample holds one image; keep rows with 'images' in a "
                                            "JSONL table")
    rel, caption = row.get(field), row.get("caption", row.get("text"))
    if not isinstance(rel, str) or not rel.strip() or not isinstance(caption, str):
        raise SkipSample("bad_record", f"{key}: needs {field!r} and 'caption' (or 'text') strings")
    if not clean_text(caption):
        raise SkipSample("empty_text", key)
    path = resolve_relative(base_dir, rel.strip())
    if not video:
        medium = _image_member(path, key)
    elif _ext(path) in VIDEO_EXTS:
        medium = (f"{key}.{_ext(path)}", read_media_file(path))
    else:
        raise Unpackable("video_extension", f"{path}: the tar reader takes videos named {'|'.join(VIDEO_EXTS)}")
    caption = valid_text(caption)
    if "\0" in caption:  # a `.txt` member holding NUL reads as UTF-16 without a byte-order mark: a JSON one keeps it
        return [medium, (f"{key}.json", json.dumps({"caption": caption}).encode())]
    return [medium, (f"{key}.txt", caption.encode())]


def _chat_members(row: dict[str, Any], base_dir: str, key: str) -> list[tuple[str, bytes]]:
    """A conversation (data/chat.py) and its media files as members `{key}.{i}.{ext}`, the paths renamed to them."""
    row = json.loads(json.dumps(row))  # a copy whose media paths are rewritten
    members: list[tuple[str, bytes]] = []

    def member(path: Any) -> str:
        if not isinstance(path, str) or not path.strip():
            raise SkipSample("bad_record", f"{key}: a media path must be a non-empty string")
        if is_data_url(path.strip()):
            return path  # inline media stay in the conversation's JSON
        source = resolve_relative(base_dir, path.strip())
        name = f"{key}.{len(members)}.{_ext(source)}"
        members.append((name, read_media_file(source)))
        return name

    if isinstance(row.get("messages"), list):
        for message in row["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            for part in content if isinstance(content, list) else []:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image", "video"):
                    part[kind] = member(part.get(kind))
                elif kind in ("image_url", "video_url"):
                    value = part.get(kind)
                    if isinstance(value, dict):
                        value["url"] = member(value.get("url"))
                    else:
                        part[kind] = member(value)
    elif isinstance(row.get("conversations"), list):
        for field in ("image", "video"):
            value = row.get(field)
            if value is not None:
                row[field] = [member(p) for p in value] if isinstance(value, list) else member(value)
    else:
        raise SkipSample("bad_record", f"{key}: no 'messages' or 'conversations' list")
    return [(f"{key}.json", json.dumps(row).encode()), *members]


def _document_members(doc: dict[str, Any], image_dir: str, key: str) -> tuple[list[tuple[str, bytes]], int]:
    """A document's shard members and how many of its images were missing. A missing image is dropped (its entry
    keeps its place, and its similarity row, but names no image, so the loader never matches it; the loader would
    skip the whole document for a missing file); a document left with no image is skipped as `missing_file`, one that
    names none (the loader never reads it) as `no_matched_image`."""
    if not isinstance(doc.get("image_info"), list) or not isinstance(doc.get("text_list"), list):
        raise SkipSample("bad_record", f"{key}: needs text_list and image_info lists")
    members: list[tuple[str, bytes]] = []
    doc = dict(doc, image_info=[dict(i) if isinstance(i, dict) else i for i in doc["image_info"]])
    missing = []
    for i, info in enumerate(doc["image_info"]):
        if not isinstance(info, dict):
            continue  # the loader refuses the document as a bad record
        name = info.get("image_name")
        if info.get("image_base64") or not isinstance(name, str):
            continue
        path = resolve_relative(image_dir, name)
        if not os.path.isfile(path):
            missing.append(name)
            info["image_name"] = None
            continue
        member = f"{key}.{i}.{_ext(path)}"
        members.append((member, read_media_file(path)))
        info["image_name"] = member
    if not members and not any(isinstance(i, dict) and i.get("image_base64") for i in doc["image_info"]):
        if missing:
            raise SkipSample("missing_file", f"{key}: none of its images exists under {image_dir!r}: {missing[:3]}")
        # no entry names an image (`image_info: []`, or MMC4 rows with only URLs, not yet downloaded)
        raise SkipSample("no_matched_image", f"{key}: no image_info entry names an image (image_name or image_base64)")
    return [(f"{key}.json", json.dumps(doc).encode()), *members], len(missing)


def _folder_pairs(directory: str) -> Iterator[tuple[str, str, str]]:
    """(key, image path, caption file) for every image with a same-stem `.txt` caption next to it."""
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lstrip(".").lower() in IMAGE_EXTS:
                yield stem, os.path.join(root, name), os.path.join(root, stem + ".txt")


def pack(out: str, *, kind: str = "pairs", source: Optional[str] = None, images: Optional[str] = None,
         image_dir: Optional[str] = None, shard_size: int = 1000) -> dict[str, Any]:
    """Write shards; returns {"shards": [...], "path": brace pattern, "samples": n, "skipped": {reason: n},
    "dropped_images": missing images left out of packed documents}."""
    if (source is None) == (images is None):
        raise ValueError("give exactly one of --from FILE (.jsonl/.csv/.json) or --images DIR")
    if images is not None and kind != "pairs":
        raise ValueError("--images DIR (images with .txt captions) packs image-text pairs only (--kind pairs)")
    if images is not None and not os.path.isdir(images):
        raise ValueError(f"--images {images!r} is not a directory (of images with same-name .txt captions)")
    if image_dir is not None and kind != "interleaved":
        raise ValueError(f"--image-dir is where an interleaved table's image_name files are: a {kind} table's rows "
                         "name their media relative to the table; leave it out")
    if image_dir is not None and not os.path.isdir(image_dir):
        raise ValueError(f"--image-dir {image_dir!r} is not a directory")
    writer = ShardWriter(out, shard_size)
    skipped: Counter[str] = Counter()
    n = dropped = 0  # dropped: missing images of packed documents
    try:
        if images is not None:
            for _, path, caption_path in _folder_pairs(images):
                try:
                    caption = caption_text(read_media_file(caption_path), caption_path).strip()
                    if not caption:
                        raise SkipSample("empty_text", caption_path)
                    writer.write([(f"{n:09d}.{_ext(path)}", read_media_file(path)), (f"{n:09d}.txt", caption.encode())])
                    n += 1
                except SkipSample as e:
                    skipped[e.reason] += 1
        else:
            assert source is not None
            for record in read_records(source):
                key = f"{n:09d}"
                try:
                    row = parse_json_record(record.payload, record.key)
                    if kind == "interleaved":
                        members, missing = _document_members(row, image_dir or record.base_dir, key)
                        dropped += missing
                    elif kind == "chat":
                        members = _chat_members(row, record.base_dir, key)
                    else:
                        members = _pair_members(row, record.base_dir, key, kind == "video")
                except (SkipSample, Unpackable) as e:
                    skipped[e.reason] += 1
                    continue
                writer.write(members)
                n += 1
    except BaseException:  # (a Ctrl-C included) a cut pack would read as a whole one with fewer samples
        writer.remove()
        raise
    writer.close()
    return {"shards": writer.paths, "path": writer.brace_pattern(), "samples": n, "skipped": merge_counts([skipped]),
            "dropped_images": dropped}
