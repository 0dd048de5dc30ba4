"""Tar shards and tables as files: compressed shards read at a plain tar's cost, damaged shards and CSV files counted
and warned about (never silently short), byte-order marks, the media extensions read from shards, member lookup by
name, and shard files closed when a stream, `inspect` or `detect_kind` ends and in a forked child."""

from __future__ import annotations

import bz2
import csv
import gc
import gzip
import io
import json
import lzma
import os
import random
import tarfile
import warnings

import pytest
from PIL import Image

from flamingo.data import build_source, sources
from flamingo.data import inspect as inspect_module
from flamingo.data.errors import SkipSample
from flamingo.data.fixtures import (
    image_bytes,
    make_pair_shards,
    mmc4_document,
    tiny_processor,
    video_bytes,
    write_tar,
)
from flamingo.data.inspect import detect_kind, inspect_dataset
from flamingo.data.sources import close_open_shards, open_shard, read_records
from flamingo.data.spec import DatasetSpec
from flamingo.train.config import DatasetSection


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _epoch(section, processor, **kwargs):
    """(batches, source, warning messages) of one epoch."""
    source = build_source(section, processor, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(source)
    return batches, source, [str(w.message) for w in caught]


def _keys(batches):
    return sorted(k for b in batches for k in b["keys"])


def _pairs_members(n: int, prefix: str = "k") -> list[tuple[str, bytes]]:
    members = []
    for i in range(n):
        members += [(f"{prefix}{i}.png", image_bytes(i)), (f"{prefix}{i}.txt", f"photo {i}".encode())]
    return members


def _shard_fds(root) -> list[str]:
    """The files under `root` and the decompressed shard copies this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)) or "flamingo-shard" in target:
            found.append(target)
    return found


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through /proc")


def test_a_shard_written_again_at_its_path_is_indexed_again(tmp_path):
    """The per-process store of open shards was keyed by path alone: data packed again into the same directory in a
    long-lived process (a notebook; an earlier Trainer still holding its stream) was read from the old index and the
    deleted file's descriptor, silently. A file written again is indexed again; the old index, whose members are
    elsewhere now, reads nothing (a bad_shard skip)."""
    path = str(tmp_path / "shard-000000.tar")
    write_tar(path, [("k0.png", image_bytes(0)), ("k0.txt", b"a wrong caption.")])
    old = open_shard(path)
    member = old.groups[0][1]["txt"]
    assert old.read(member) == b"a wrong caption."
    os.remove(path)
    write_tar(path, [("k0.png", image_bytes(1)), ("k0.txt", b"the fixed caption.")])
    new = open_shard(path)
    assert new is not old and new.read(new.groups[0][1]["txt"]) == b"the fixed caption."
    assert open_shard(path) is new  # unchanged since: the cached index
    with pytest.raises(SkipSample, match="written again since it was indexed"):
        old.read(member)
    close_open_shards()


# --------------------------------------------------------------------------------------------------- compressed
@pytest.mark.parametrize("suffix,compress", [(".tar.gz", gzip.compress), (".tgz", gzip.compress),
                                             (".tar.bz2", bz2.compress), (".tar.xz", lzma.compress)])
def test_a_compressed_shard_is_decompressed_once_and_read_in_any_order(tmp_path, suffix, compress):
    """Reading members of a gzip stream in place seeks back through the compressed bytes (each read cost its
    offset): the shard is decompressed once into a copy, so the compressed file is never read again."""
    members = _pairs_members(30)
    plain = write_tar(str(tmp_path / "s.tar"), members)
    packed = tmp_path / f"s{suffix}"
    packed.write_bytes(compress(open(plain, "rb").read()))
    shard = open_shard(str(packed))
    assert shard.error is None and len(shard.groups) == 30
    packed.write_bytes(b"")  # gone: only the copy can answer now
    by_name = dict(members)
    for _, group in reversed(shard.groups):  # backwards: the order a gzip stream is slowest in
        for member in group.values():
            assert shard.read(member) == by_name[member.name]
    close_open_shards()


@pytest.mark.parametrize("suffix,compress", [(".tar.gz", gzip.compress), (".tar.xz", lzma.compress),
                                             (".tbz2", bz2.compress)])
def test_a_compressed_dataset_directory_gives_the_plain_shards_batches(tmp_path, processor, suffix, compress):
    data = make_pair_shards(str(tmp_path / "plain"), 12, 4)
    os.makedirs(tmp_path / "gz")
    for path in data["files"]:
        with open(path, "rb") as f:
            (tmp_path / "gz" / (os.path.basename(path)[:-len(".tar")] + suffix)).write_bytes(compress(f.read()))
    options = {"shuffle_buffer": 5}
    plain, _, _ = _epoch(DatasetSection("p", "pairs", data["path"], 2, options=options), processor)
    packed, source, _ = _epoch(DatasetSection("p", "pairs", str(tmp_path / "gz"), 2, options=options), processor)
    assert [b["keys"] for b in packed] == [[k.replace(".tar:", f"{suffix}:") for k in b["keys"]] for b in plain]
    assert source.skipped == {}


@needs_proc
def test_a_forked_worker_reads_its_parents_decompressed_copy(tmp_path):
    """The copy is read through views with their own positions: a child's reads never move the parent's."""
    members = _pairs_members(8)
    packed = tmp_path / "s.tar.gz"
    packed.write_bytes(gzip.compress(open(write_tar(str(tmp_path / "s.tar"), members), "rb").read()))
    shard = open_shard(str(packed))
    order = [m for _, group in shard.groups for m in group.values()]
    assert shard.read(order[0]) == members[0][1]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own reads, backwards
        ok = all(shard.read(m) == dict(members)[m.name] for m in reversed(order))
        os.write(write_end, b"1" if ok else b"0")
        os._exit(0)
    os.close(write_end)
    assert all(shard.read(m) == dict(members)[m.name] for m in order)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    os.close(read_end)
    close_open_shards()


# --------------------------------------------------------------------------------------------------- damaged shards
def _cut(path: str, at: int, out: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    with open(out, "wb") as f:
        f.write(data[:at])
    return out


def _offsets(path: str) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf}


@pytest.mark.parametrize("where", ["at_a_header", "inside_a_header", "inside_data", "no_end_block"])
def test_a_truncated_shard_is_warned_about_and_its_cut_sample_counted_as_bad_shard(tmp_path, processor, where):
    """tarfile reads a shard cut at or inside a member header as a whole archive that just ends: without the
    end-of-archive block it is damaged (an interrupted pack or copy, a shard still being written)."""
    whole = write_tar(str(tmp_path / "whole.tar"), _pairs_members(6))
    header, data = _offsets(whole)["k3.png"]
    end = _offsets(whole)["k5.txt"][1] + 512  # right after the last member's data: the end blocks cut off
    at = {"at_a_header": header, "inside_a_header": header + 100, "inside_data": data + 20, "no_end_block": end}
    path = _cut(whole, at[where], str(tmp_path / "cut.tar"))
    batches, source, messages = _epoch(DatasetSection("p", "pairs", path, 1, options={"shuffle": False}), processor)
    kept = {"at_a_header": 2, "inside_a_header": 2, "inside_data": 3, "no_end_block": 5}[where]
    assert _keys(batches) == [f"cut.tar:k{i}" for i in range(kept)]  # the group at the cut is left out too
    assert source.skipped == {"bad_shard": 1}
    assert any("cut.tar' is damaged" in m and "bad_shard" in m for m in messages)


def test_an_intact_shard_is_read_without_a_warning(tmp_path, processor):
    path = write_tar(str(tmp_path / "whole.tar"), _pairs_members(3))
    batches, source, messages = _epoch(DatasetSection("p", "pairs", path, 1), processor)
    assert len(batches) == 3 and source.skipped == {} and not any("damaged" in m for m in messages)


@pytest.mark.parametrize("payload", ["random", "repetitive"])  # (deflate stores the first, codes the second)
def test_a_gzipped_shard_corrupt_in_the_middle_is_warned_about_and_counted(tmp_path, payload):
    rng = random.Random(0)
    members = [(f"k{i}.{ext}", rng.randbytes(4000) if payload == "random" else f"{ext} {i} ".encode() * 400)
               for i in range(60) for ext in ("bin", "txt")]
    data = bytearray(gzip.compress(open(write_tar(str(tmp_path / "s.tar"), members), "rb").read()))
    data[len(data) // 2:len(data) // 2 + 200] = rng.randbytes(200)
    path = tmp_path / "corrupt.tar.gz"
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"corrupt\.tar\.gz' is damaged .*bad_shard"):
        records = list(read_records(str(path)))
    with pytest.raises(SkipSample, match="bad_shard"):
        records[-1].check()
    assert 0 < len(records) - 1 < 60  # the samples before the damage are kept
    close_open_shards()


# --------------------------------------------------------------------------------------------------- tables
BOM = "\ufeff"


def _pair_tables(root, n: int = 3, encoding: str = "utf-8") -> dict[str, str]:
    rows = []
    for i in range(n):
        (root / f"{i}.png").write_bytes(image_bytes(i))
        rows.append({"image": f"{i}.png", "caption": f"photo {i}"})
    lines = "\n".join(json.dumps(r) for r in rows) + "\n"
    table = "image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows)
    files = {"pairs.jsonl": lines, "pairs.csv": table, "pairs.json": json.dumps(rows)}
    for name, text in files.items():
        (root / name).write_text(BOM + text, encoding=encoding)  # (UTF-16/32: the BOM in that encoding)
    return {name: str(root / name) for name in files}


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16-le", "utf-16-be", "utf-32-le"])
@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.csv", "pairs.json"])
def test_tables_written_with_a_byte_order_mark_lose_no_record(tmp_path, processor, name, encoding):
    """Excel's "CSV UTF-8" and Notepad start the file with a BOM: not part of the first field name or line. Notepad's
    "Unicode" (and Excel's "Unicode Text") is UTF-16 with a BOM, read as such (every row was lost as bad JSON)."""
    path = _pair_tables(tmp_path, encoding=encoding)[name]
    batches, source, _ = _epoch(DatasetSection("p", "pairs", path, 1), processor)
    assert len(batches) == 3 and source.skipped == {}


def test_a_tar_json_member_with_a_byte_order_mark_parses():
    assert sources.parse_json_record((BOM + '{"caption": "x"}').encode(), "k") == {"caption": "x"}


def test_a_tar_txt_caption_with_a_byte_order_mark_has_no_bom(tmp_path, processor):
    path = write_tar(str(tmp_path / "s.tar"), [("k0.png", image_bytes(0)), ("k0.txt", (BOM + "photo 0").encode())])
    spec = DatasetSpec.create("p", "pairs", path, 1, {}, processor)
    (record,) = read_records(path)
    assert BOM not in spec.example(record).text and "photo 0" in spec.example(record).text
    close_open_shards()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-32"])
def test_a_tar_txt_caption_in_utf16_or_utf32_with_a_byte_order_mark_is_decoded(tmp_path, processor, encoding):
    """Windows Notepad's "Unicode" is UTF-16 LE with a byte-order mark: read as UTF-8 it was two U+FFFD and
    NUL-interleaved letters."""
    codec, bom = {"utf-16-le-bom": ("utf-16-le", b"\xff\xfe"), "utf-16-be-bom": ("utf-16-be", b"\xfe\xff")}.get(
        encoding, (encoding, b""))
    data = bom + "a photo of a cat".encode(codec)
    path = write_tar(str(tmp_path / "s.tar"), [("k0.png", image_bytes(0)), ("k0.txt", data)])
    spec = DatasetSpec.create("p", "pairs", path, 1, {}, processor)
    (record,) = read_records(path)
    assert spec.example(record).text.startswith("<image>a photo of a cat<|endofchunk|>")
    close_open_shards()


def test_a_tar_txt_caption_holding_nul_is_counted_as_bad_record(tmp_path, processor):
    """UTF-16 without a byte-order mark cannot be told from UTF-8 but by its NULs: skipped, never trained."""
    members = [("k0.png", image_bytes(0)), ("k0.txt", "a photo of a cat".encode("utf-16-le")),
               ("k1.png", image_bytes(1)), ("k1.txt", b"a dog")]
    path = write_tar(str(tmp_path / "s.tar"), members)
    batches, source, _ = _epoch(DatasetSection("p", "pairs", path, 1, options={"shuffle": False}), processor)
    assert _keys(batches) == ["s.tar:k1"] and source.skipped == {"bad_record": 1}
    with pytest.raises(SkipSample, match="NUL"):
        sources.caption_text("x".encode("utf-16-be"), "k")


def test_a_json_table_with_a_byte_that_is_not_utf8_is_read_like_jsonl(tmp_path, processor):
    """A Latin-1 `é` in a `.json` list: U+FFFD and the record kept, as in a JSONL or CSV table (it aborted the whole
    dataset with a UnicodeDecodeError naming no file)."""
    (tmp_path / "0.png").write_bytes(image_bytes(0))
    rows = '[{"image": "0.png", "caption": "caf\xe9"}, {"image": "0.png", "caption": "tea"}]'.encode("latin-1")
    for name in ("rows.json", "rows.jsonl"):
        (tmp_path / name).write_bytes(rows if name.endswith(".json") else rows[1:-1].replace(b"}, {", b"}\n{"))
        batches, source, _ = _epoch(DatasetSection("p", "pairs", str(tmp_path / name), 1,
                                                   options={"shuffle": False}), processor)
        captions = [processor.tokenizer.decode(b["input_ids"][0], skip_special_tokens=True) for b in batches]
        assert len(batches) == 2 and source.skipped == {} and "caf\ufffd" in captions[0], (name, captions)


def _csv(root, captions: list[str]) -> str:
    (root / "0.png").write_bytes(image_bytes(0))
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(["0.png", c] for c in captions)
    return str(root / "pairs.csv")


def test_a_csv_caption_over_the_csv_modules_default_field_limit_is_read(tmp_path, processor):
    path = _csv(tmp_path, [f"caption {i}" if i != 1 else "long " * 40_000 for i in range(30)])  # 200,000 chars
    batches, source, _ = _epoch(DatasetSection("p", "pairs", path, 1), processor)
    assert len(batches) == 30 and source.skipped == {}


def test_csv_rows_past_a_parse_error_are_counted_and_the_line_named(tmp_path, monkeypatch):
    """Where the csv parser cannot go on, the rest of the file is lost: each line of it counts as bad_record."""
    path = _csv(tmp_path, ["x" * 2000 if i == 1 else f"caption {i}" for i in range(30)])
    monkeypatch.setattr(sources, "_CSV_FIELD_LIMIT", 1000)
    try:
        with pytest.warns(UserWarning, match=r"malformed after line 2 .*field larger.*remaining 29 line\(s\)"):
            records = list(read_records(path))
    finally:
        csv.field_size_limit(2**31 - 1)
    assert len(records) == 30
    lost = []
    for record in records[1:]:
        with pytest.raises(SkipSample, match="bad_record") as e:
            record.check()
        lost.append(e.value.reason)
    assert lost == ["bad_record"] * 29


def test_a_csv_quote_left_open_does_not_take_the_rest_of_the_file_into_a_caption(tmp_path):
    (tmp_path / "pairs.csv").write_text('image,caption\n0.png,one\n0.png,"two\n0.png,three\n0.png,four\n')
    with pytest.warns(UserWarning, match="malformed after line 2"):
        records = list(read_records(str(tmp_path / "pairs.csv")))
    assert records[0].payload == {"image": "0.png", "caption": "one"}
    assert [r.lost[0] for r in records[1:]] == ["bad_record"] * 3



def test_record_keys_are_the_line_numbers_an_editor_shows(tmp_path):
    """docs/data.md: a key is `file:line`. JSONL and CSV keys counted lines from 0 (and CSV rows, not lines), so a
    skip report named the line above the bad one."""
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [r.key for r in read_records(str(tmp_path / "rows.jsonl"))] == ["rows.jsonl:1", "rows.jsonl:3"]
    (tmp_path / "pairs.csv").write_text('image,caption\n0.png,one\n0.png,"two\nlines"\n0.png,three\n0.png,"four\n')
    with pytest.warns(UserWarning, match="malformed after line 5"):
        records = list(read_records(str(tmp_path / "pairs.csv")))
    assert [(r.key, r.lost is None) for r in records] == [("pairs.csv:2", True), ("pairs.csv:4", True),
                                                          ("pairs.csv:5", True), ("pairs.csv:6", False)]
    (tmp_path / "first.csv").write_text('image,caption\n0.png,"one\n0.png,two\n')
    with pytest.warns(UserWarning, match="malformed after line 1 .*remaining 2 line"):
        assert [r.key for r in read_records(str(tmp_path / "first.csv"))] == ["first.csv:2", "first.csv:3"]

# --------------------------------------------------------------------------------------------------- media members
def _image(fmt: str, i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10 * i, 0, 0)).save(buf, format=fmt)
    return buf.getvalue()


def test_every_image_format_pil_reads_and_every_video_container_is_read_from_shards(tmp_path, processor):
    """The formats `flamingo data pack` copies into shards as they are, as tables name them."""
    formats = {"jpg": "JPEG", "JPG": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP",
               "tif": "TIFF", "tiff": "TIFF"}
    members = []
    for i, (ext, fmt) in enumerate(formats.items()):
        members += [(f"k{i}.{ext}", _image(fmt, i)), (f"k{i}.txt", f"photo {ext}".encode())]
    images = write_tar(str(tmp_path / "images.tar"), members)
    batches, source, _ = _epoch(DatasetSection("p", "pairs", images, 1), processor)
    assert len(batches) == len(formats) and source.skipped == {}

    clip = video_bytes(2)
    containers = ["mp4", "m4v", "mov", "avi", "mkv", "webm", "mpg", "mpeg", "3gp", "flv", "wmv"]
    members = [m for i, ext in enumerate(containers) for m in ((f"v{i}.{ext}", clip), (f"v{i}.txt", b"a clip"))]
    videos = write_tar(str(tmp_path / "videos.tar"), members)  # (the bytes are an mp4: PyAV reads by content)
    batches, source, _ = _epoch(DatasetSection("v", "video", videos, 1, options={"max_frames": 2}), processor)
    assert len(batches) == len(containers) and source.skipped == {}
    assert detect_kind(videos) == "video" and detect_kind(images) == "pairs"


# --------------------------------------------------------------------------------------------------- member lookup
def test_a_member_is_looked_up_in_the_records_own_group_and_never_by_a_shared_basename(tmp_path):
    """Documents each naming `0.png`, stored as `docN/0.png`: the basename alone would hand every document the
    first one's image."""
    members = []
    for d in range(3):
        doc = mmc4_document(2, {0: 1}, image_names=["0.png"])
        members += [(f"doc{d}.json", json.dumps(doc).encode()), (f"doc{d}/0.png", image_bytes(d)),
                    (f"doc{d}.1.png", image_bytes(10 + d))]
    members.append(("extra/solo.png", image_bytes(99)))
    shard = open_shard(write_tar(str(tmp_path / "docs.tar"), members))
    records = list(read_records(shard.path, "json"))
    assert [r.group for r in records] == ["doc0", "doc1", "doc2"]
    for d, record in enumerate(records):
        assert shard.find("0.png", record.group).name == f"doc{d}/0.png"  # `{key}/{name}`
        assert shard.find("1.png", record.group).name == f"doc{d}.1.png"  # `{key}.{name}`
    assert shard.find("0.png") is None  # three members share the basename: none of them
    assert shard.find("doc2/0.png").name == "doc2/0.png"  # a full name
    assert shard.find("images/solo.png").name == "extra/solo.png"  # a basename only one member has

    spec = DatasetSpec.create("d", "interleaved", shard.path, 1, {}, None)
    for d, record in enumerate(records):  # each document gets its own image, or none: never another's
        try:
            assert [m.read() for m in spec.example(record).media] == [image_bytes(d)]
        except SkipSample as e:
            assert e.reason == "missing_file"
    close_open_shards()


# --------------------------------------------------------------------------------------------------- repeated keys
def test_a_key_repeating_a_member_keeps_its_first_sample_and_counts_the_others(tmp_path, processor):
    """`k.png k.txt k.png` (a second sample under `k` whose caption never made it) gave image 2 sample 1's caption;
    `a.png a.txt a.png a.txt` (a sample appended again) lost one, uncounted. A key's first sample is read, each later
    one under it is skipped as `duplicate_key`: never two samples merged, never one lost uncounted
    (tests/test_data_tar_keys.py has the other layouts)."""
    members = [("k.png", image_bytes(1)), ("k.txt", b"caption of image one"), ("k.png", image_bytes(2)),
               ("a.png", image_bytes(3)), ("a.txt", b"first"), ("a.png", image_bytes(4)), ("a.txt", b"second"),
               ("b.png", image_bytes(5)), ("b.txt", b"bee")]
    path = write_tar(str(tmp_path / "dup.tar"), members)
    section = DatasetSection("p", "pairs", path, 1, options={"shuffle": False})
    batches, source, messages = _epoch(section, processor)
    assert sorted(_keys(batches)) == ["dup.tar:a", "dup.tar:b", "dup.tar:k"]
    assert source.skipped == {"duplicate_key": 2}
    with pytest.warns(UserWarning, match="duplicate_key"):
        report = inspect_dataset(path, "pairs")
    assert report.samples == 3 and report.skipped == {"duplicate_key": 2}
    close_open_shards()

    docs = [("d.json", json.dumps(mmc4_document(2, {0: 1}, image_names=["d.0.png"])).encode()),
            ("d.0.png", image_bytes(1))] * 2
    with pytest.warns(UserWarning, match="duplicate_key"):
        records = list(read_records(write_tar(str(tmp_path / "docs.tar"), docs), "json"))
    assert [r.lost[0] if r.lost else None for r in records] == [None, "duplicate_key"]
    close_open_shards()


def test_a_document_whose_key_repeats_further_apart_keeps_its_own_image(tmp_path):
    """`d` twice, apart: the first `d.json` reads its own `d.0.png` (the later `d` is skipped; `read_records`'
    check counts it as `duplicate_key`), and `e` between them reads its own."""
    doc = json.dumps(mmc4_document(2, {0: 1}, image_names=["d.0.png"])).encode()
    members = [("d.json", doc), ("d.0.png", image_bytes(1)), ("e.json", doc.replace(b"d.0", b"e.0")),
               ("e.0.png", image_bytes(2)), ("d.json", doc), ("d.0.png", image_bytes(3))]
    path = write_tar(str(tmp_path / "docs.tar"), members)
    spec = DatasetSpec.create("d", "interleaved", path, 1, {}, None)
    outcomes = []
    for record in read_records(path, "json"):
        try:
            outcomes.append([m.read() for m in spec.example(record).media])
        except SkipSample as e:
            outcomes.append(e.reason)
    assert outcomes[:2] == [[image_bytes(1)], [image_bytes(2)]] and isinstance(outcomes[2], str)
    close_open_shards()


# --------------------------------------------------------------------------------------------------- dataset paths
def test_a_file_name_holding_glob_characters_is_taken_as_it_is(tmp_path):
    for name in ("pairs [v2].jsonl", "what?.jsonl", "a*b.jsonl"):
        (tmp_path / name).write_text("{}\n")
        assert sources.expand_path(str(tmp_path / name)) == [str(tmp_path / name)]
    assert sources.expand_path(str(tmp_path / "*.jsonl")) == sorted(str(p) for p in tmp_path.glob("*.jsonl"))


def test_an_img2dataset_folder_is_read_as_its_shards_and_its_sidecars_left_out(tmp_path, processor):
    """img2dataset writes `00000.tar`, `00000.parquet` and `00000_stats.json` (a JSON object): the sidecar failed
    the epoch when it was reached, after the first shard had trained."""
    folder = tmp_path / "laion"
    for s in range(2):
        write_tar(str(folder / f"{s:05d}.tar"), _pairs_members(2, prefix=f"{s}k"))
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": 2, "successes": 2}))
    source = build_source(DatasetSection("laion", "pairs", str(folder), 1), processor)
    assert [os.path.basename(f) for f in source.spec.files] == ["00000.tar", "00001.tar"]
    batches, source, _ = _epoch(DatasetSection("laion", "pairs", str(folder), 1), processor)
    assert len(batches) == 4 and source.skipped == {}


def test_a_json_file_that_holds_no_list_is_refused_when_the_dataset_is_built(tmp_path, processor):
    (tmp_path / "0.png").write_bytes(image_bytes(0))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "0.png", "caption": "x"}) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"count": 1}))
    for path in (tmp_path, tmp_path / "meta.json"):  # a directory of tables, or the file named
        with pytest.raises(ValueError, match=r"meta\.json' must hold a JSON list of records"):
            build_source(DatasetSection("p", "pairs", str(path), 1), processor)


# --------------------------------------------------------------------------------------------------- open files
@needs_proc
def test_shard_files_are_closed_when_an_epoch_inspect_or_detect_kind_ends(tmp_path, processor):
    data = make_pair_shards(str(tmp_path), 12, 2)  # 6 shards
    gz = tmp_path / "gz" / "s.tar.gz"
    os.makedirs(gz.parent)
    gz.write_bytes(gzip.compress(open(data["files"][0], "rb").read()))
    close_open_shards()
    gc.collect()
    assert _shard_fds(tmp_path) == []
    for path in (data["path"], str(gz)):
        _epoch(DatasetSection("p", "pairs", path, 1), processor)
        gc.collect()
        assert _shard_fds(tmp_path) == [] and len(sources._OPEN_SHARDS) == 0
    inspect_dataset(data["path"], "pairs")
    assert _shard_fds(tmp_path) == []
    assert detect_kind(data["path"]) == "pairs"
    assert _shard_fds(tmp_path) == []


@needs_proc
def test_a_forked_child_closes_the_shards_its_parent_had_open(tmp_path):
    paths = make_pair_shards(str(tmp_path), 6, 2)["files"]
    for path in paths:
        open_shard(path)
    assert len(_shard_fds(tmp_path)) == 3
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, json.dumps([_shard_fds(tmp_path), len(sources._OPEN_SHARDS)]).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    assert json.loads(os.read(read_end, 4096)) == [[], 0]
    os.close(read_end)
    assert len(_shard_fds(tmp_path)) == 3  # the parent's stay open
    close_open_shards()


def test_inspect_with_a_limit_opens_no_file_after_the_last_record(tmp_path, monkeypatch):
    data = make_pair_shards(str(tmp_path), 10, 1)  # 10 shards of one sample
    opened = []
    real = inspect_module.read_records

    def logged(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(inspect_module, "read_records", logged)
    report = inspect_dataset(data["path"], "pairs", limit=2)
    assert report.records == 2 and opened == ["shard-000000.tar", "shard-000001.tar"]


def test_inspect_counts_what_a_damaged_shard_lost(tmp_path):
    whole = write_tar(str(tmp_path / "whole.tar"), _pairs_members(4))
    path = _cut(whole, _offsets(whole)["k2.png"][0], str(tmp_path / "cut.tar"))
    with pytest.warns(UserWarning, match="damaged"):
        report = inspect_dataset(path, "pairs")
    assert report.samples == 1 and report.skipped == {"bad_shard": 1}
