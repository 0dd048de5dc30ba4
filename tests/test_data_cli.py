"""`flamingo data inspect` / `flamingo data pack`: counts, contact sheet, the kind told from the files, shards the
loader reads back."""

import csv
import json
import os
import tarfile
import warnings

import pytest
from PIL import Image

from flamingo.cli import main
from flamingo.data import build_source
from flamingo.data.fixtures import (
    make_interleaved,
    make_pair_shards,
    make_pairs,
    make_videos,
    mmc4_document,
    tiny_processor,
    write_jsonl,
)
from flamingo.data.inspect import detect_kind, inspect_dataset
from flamingo.train.config import DatasetSection

from helpers import interrupted_at


def test_inspect_cli_counts_samples_skips_tokens_and_draws_a_contact_sheet(tmp_path, capsys):
    data = make_pairs(str(tmp_path / "p"), 5)
    processor_dir = tmp_path / "proc"
    tiny_processor().save_pretrained(str(processor_dir))
    out = tmp_path / "report"
    assert main(["data", "inspect", data["path"], "--kind", "pairs", "--tokenizer-from", str(processor_dir),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    assert summary["samples"] == 5 and summary["media"] == 5 and summary["frames"] == 5
    assert summary["records"] == 9 and summary["skipped"] == data["bad"]
    # each reason says why its first sample was skipped, in the table and the summary
    assert set(summary["first_skip"]) == set(data["bad"])
    assert summary["first_skip"]["empty_text"].endswith("empty caption")
    assert any(line.startswith("skipped: empty_text") and line.endswith("1 (the first: pairs.jsonl:8: empty caption)")
               for line in printed)
    assert summary["tokens"] > 5 * 3
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 100 and sheet.size[1] > 100


def test_inspect_counts_the_samples_max_tokens_cuts(tmp_path):
    data = make_pairs(str(tmp_path / "p"), 4, bad=False)
    processor = tiny_processor()
    whole = inspect_dataset(data["path"], "pairs", processor)
    assert whole.truncated == 0 and "cut by max_tokens" in whole.table()
    cut = inspect_dataset(data["path"], "pairs", processor, options={"max_tokens": 3})
    assert cut.truncated == 4 and cut.to_dict()["truncated"] == 4
    assert inspect_dataset(data["path"], "pairs").truncated is None  # no tokenizer: not counted


def test_inspect_without_tokenizer_counts_documents_videos_and_frames(tmp_path):
    docs = make_interleaved(str(tmp_path / "i"), 3)
    report = inspect_dataset(docs["path"], "interleaved", options={"image_dir": docs["image_dir"]})
    assert (report.samples, report.media, report.tokens) == (3, 6, None)
    assert report.skipped == docs["bad"]
    clips = make_videos(str(tmp_path / "v"), 2, seconds=3)
    report = inspect_dataset(clips["path"], "video", options={"max_frames": 2})
    assert (report.samples, report.media, report.frames) == (2, 2, 4) and report.skipped == clips["bad"]


def test_packed_pairs_and_interleaved_shards_load_back(tmp_path, capsys):
    processor = tiny_processor()
    pairs = make_pairs(str(tmp_path / "p"), 5)
    assert main(["data", "pack", "--from", pairs["path"], "--out", str(tmp_path / "ps"), "--shard-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "packed 6 samples into 3 shard(s)" in printed  # the corrupt image is packed (the loader skips it)
    pattern = printed.strip().splitlines()[-1].split(": ", 1)[1]
    src = build_source(DatasetSection("p", "pairs", pattern, 1, options={"shuffle": False}), processor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = [k for b in src for k in b["keys"]]
    assert len(keys) == 5 and src.skipped == {"bad_image": 1}

    docs = make_interleaved(str(tmp_path / "i"), 4)
    # a document with one image missing of two: packed with the other (its sentence keeps no image)
    half = mmc4_document(4, {0: 1, 1: 3}, image_names=["d1_0.png", "gone.png"])
    with open(docs["path"], "a") as f:
        f.write(json.dumps(half) + "\n")
    assert main(["data", "pack", "--kind", "interleaved", "--from", docs["path"], "--image-dir", docs["image_dir"],
                 "--out", str(tmp_path / "is" / "docs-%04d.tar"), "--shard-size", "3"]) == 0
    printed = capsys.readouterr().out
    # the document whose only image is missing is skipped here; the half one loses one image, counted
    assert "packed 7 samples" in printed and "'missing_file': 1" in printed
    assert "dropped 1 missing image(s) of packed documents" in printed
    shards = sorted(os.listdir(tmp_path / "is"))
    assert shards == ["docs-0000.tar", "docs-0001.tar", "docs-0002.tar"]
    src = build_source(DatasetSection("i", "interleaved", str(tmp_path / "is"), 1), processor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(src)
    assert sorted(int(b["num_media"][0]) for b in batches) == [1, 2, 2, 2, 2]
    assert src.skipped == {"empty_text": 1, "no_matched_image": 1}


@pytest.mark.parametrize("pattern", ["shard-%06d.tar", "s-%d.tar", "s-%03d"])
def test_printed_dataset_path_names_every_packed_shard(tmp_path, pattern):
    # 11 shards: the first and last names share the number's last digit (shard-000000.tar, shard-000010.tar)
    from flamingo.data.pack import pack
    from flamingo.data.sources import expand_path

    pairs = make_pairs(str(tmp_path / "p"), 11, bad=False)
    result = pack(str(tmp_path / "out" / pattern), source=pairs["path"], shard_size=1)
    assert len(result["shards"]) == 11
    assert expand_path(result["path"]) == result["shards"]


def test_pack_into_an_earlier_packs_shards_is_refused(tmp_path, capsys):
    """A pack run again into the same --out (with another --shard-size, after rows were fixed): its shards are
    written in place, so the earlier ones past its last would be read as part of the dataset (18 samples of 12)."""
    pairs = make_pairs(str(tmp_path / "p"), 12, bad=False)
    out = tmp_path / "out"
    assert main(["data", "pack", "--from", pairs["path"], "--out", str(out), "--shard-size", "2"]) == 0
    before = sorted(os.listdir(out))
    capsys.readouterr()
    for target in (str(out), str(out / "shard-%06d.tar")):
        assert main(["data", "pack", "--from", pairs["path"], "--out", target, "--shard-size", "5"]) == 2
        assert "already holds 6 shard(s) of an earlier pack (shard-000000.tar, shard-000001.tar, " \
               "shard-000002.tar, ...)" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before
    (out / "notes.txt").write_text("kept")  # files the pattern does not name are no shards
    assert main(["data", "pack", "--from", pairs["path"], "--out", str(out / "s5-%d.tar"), "--shard-size", "5"]) == 0


def test_a_pack_that_does_not_end_leaves_no_shards(tmp_path, monkeypatch):
    """A Ctrl-C (or an error) half way: the shard being written was closed as a whole one, so the cut pack read as a
    dataset of fewer samples, without a warning. Its shards are removed, and the same pack runs again."""
    from flamingo.data import pack as pack_module

    pairs = make_pairs(str(tmp_path / "p"), 12, bad=False)
    members = pack_module._pair_members
    monkeypatch.setattr(pack_module, "_pair_members", interrupted_at(members, 7))
    with pytest.raises(KeyboardInterrupt):
        pack_module.pack(str(tmp_path / "out"), source=pairs["path"], shard_size=2)
    assert os.listdir(tmp_path / "out") == []
    monkeypatch.undo()
    # a full disk: the write fails, and closing the shard (its end blocks) would fail too
    import tarfile

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    seen = []
    monkeypatch.setattr(pack_module, "_pair_members", lambda *a, **k: members(*a, **k) if len(seen.append(1) or seen)
                        < 7 else full())
    monkeypatch.setattr(tarfile.TarFile, "close", full)
    with pytest.raises(OSError, match="No space left"):
        pack_module.pack(str(tmp_path / "out"), source=pairs["path"], shard_size=2)
    assert os.listdir(tmp_path / "out") == []
    monkeypatch.undo()
    assert pack_module.pack(str(tmp_path / "out"), source=pairs["path"], shard_size=2)["samples"] == 12


def test_pack_with_no_good_row_fails_saying_why(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"image": "missing.png", "caption": "a red square."}) + "\n")
    assert main(["data", "pack", "--from", str(rows), "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "dataset path" not in captured.out and "no sample could be packed" in captured.err
    assert "missing_file" in captured.err


def test_pack_writes_only_rows_the_loader_reads_back(tmp_path):
    """Every row pack counts as packed loads from its shard: a caption given as `text` (the loader takes it), an
    image file without an extension or in a format the tar reader lists under no extension (named by its format,
    or re-encoded as PNG), a caption with half an emoji, one holding NUL (a `.txt` member holding NUL reads as
    UTF-16 without a byte-order mark, so it is written as `.json`); MMICL rows declaring several images, which a
    pair sample cannot hold, are left out under a reason of their own, as are videos whose extension the tar reader
    lacks."""
    from flamingo.data.pack import pack

    root = tmp_path / "t"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(root / "img" / "a.png")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "img" / "3f2a9c", format="JPEG")  # no extension
    Image.new("RGB", (8, 8), (0, 0, 200)).save(root / "img" / "b.ppm")  # PIL reads it; no tar reader lists it
    rows = [{"image": "img/a.png", "text": "a caption in 'text'"},
            {"image": "img/3f2a9c", "caption": "a JPEG without an extension"},
            {"image": "img/b.ppm", "caption": "a PPM"},
            {"image": "img/a.png", "caption": "half an emoji \ud83d here"},
            {"image": "img/a.png", "caption": "a scraped\u0000 caption"},
            {"images": ["img/a.png", "img/b.ppm"], "caption": "Image 0 is <image0>. Image 1 is <image1>."}]
    table = root / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = pack(str(tmp_path / "out"), source=str(table))
    assert result["samples"] == 5 and result["skipped"] == {"multi_image_row": 1}
    src = build_source(DatasetSection("p", "pairs", result["path"], 1, options={"shuffle": False}),
                       tiny_processor())
    assert len(list(src)) == 5 and src.skipped == {}
    with tarfile.open(result["shards"][0]) as tar:
        assert [n for n in tar.getnames() if not n.endswith(".txt")] == [
            "000000000.png", "000000001.jpg", "000000002.png", "000000003.png", "000000004.png", "000000004.json"]
        assert json.load(tar.extractfile("000000004.json")) == {"caption": "a scraped\u0000 caption"}
    videos = root / "videos.jsonl"
    videos.write_text(json.dumps({"video": "img/a.png", "caption": "not a video container"}) + "\n")
    assert pack(str(tmp_path / "vout"), kind="video", source=str(videos))["skipped"] == {"video_extension": 1}


def test_pack_image_folder_with_txt_captions(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(folder / f"im{i}.jpg")
        (folder / f"im{i}.txt").write_text(f"red level {i}")
    from flamingo.data.pack import pack

    result = pack(str(tmp_path / "out"), images=str(folder), shard_size=10)
    assert result["samples"] == 3 and len(result["shards"]) == 1


def test_pack_image_folder_decodes_utf16_captions_and_counts_unreadable_ones(tmp_path):
    """Notepad's "Unicode" captions (UTF-16 with a byte-order mark) were packed as two U+FFFD and NUL-interleaved
    letters; UTF-16 without the mark cannot be read, and is counted, never packed."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, text, encoding in [("cat", "a photo of a cat", "utf-16"), ("dog", "a dog", "utf-8-sig"),
                                 ("owl", "an owl", "utf-16-le")]:
        Image.new("RGB", (8, 8), (200, 0, 0)).save(folder / f"{name}.jpg")
        (folder / f"{name}.txt").write_bytes(text.encode(encoding))
    from flamingo.data.pack import pack

    result = pack(str(tmp_path / "out"), images=str(folder), shard_size=10)
    assert result["samples"] == 2 and result["skipped"] == {"bad_record": 1}
    with tarfile.open(result["shards"][0]) as tar:
        captions = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert captions == [b"a photo of a cat", b"a dog"]


def _pairs_csv(root):
    make_pairs(str(root), 3, bad=False)
    path = root / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        writer.writerows({"image": f"images/{i}.png", "caption": f"photo {i}"} for i in range(3))
    return str(path)


@pytest.mark.parametrize("layout, kind", [
    ("pairs-jsonl", "pairs"), ("pairs-csv", "pairs"), ("pairs-tar", "pairs"), ("interleaved-jsonl", "interleaved"),
    ("interleaved-tar", "interleaved"), ("video-jsonl", "video"), ("video-tar", "video")])
def test_detect_kind_tells_each_kind_in_each_format(tmp_path, layout, kind):
    """Bad records (malformed lines, a document's image-only tar groups) do not confuse it."""
    path = {"pairs-jsonl": lambda: make_pairs(str(tmp_path), 3)["path"],
            "pairs-csv": lambda: _pairs_csv(tmp_path),
            "pairs-tar": lambda: make_pair_shards(str(tmp_path), 4, 2, bad=True)["path"],
            "interleaved-jsonl": lambda: make_interleaved(str(tmp_path), 3)["path"],
            "interleaved-tar": lambda: make_interleaved(str(tmp_path), 3, tar_shards=2)["path"],
            "video-jsonl": lambda: make_videos(str(tmp_path), 2, seconds=1)["path"],
            "video-tar": lambda: make_pair_shards(str(tmp_path), 2, 1, video=True, seconds=1)["path"]}[layout]()
    assert detect_kind(path) == kind


def test_inspect_without_kind_detects_it_and_says_so(tmp_path, capsys):
    clips = make_videos(str(tmp_path), 2, seconds=3)
    assert main(["data", "inspect", clips["path"], "--option", "max_frames=2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("kind: video (detected")
    summary = json.loads(out[-1])
    assert (summary["kind"], summary["samples"], summary["frames"]) == ("video", 2, 4)


def test_inspect_without_kind_on_mixed_or_unknown_records_asks_for_kind(tmp_path, capsys):
    mixed = write_jsonl(str(tmp_path / "mixed.jsonl"), [{"image": "a.png", "caption": "a"},
                                                       {"video": "b.mp4", "caption": "b"}])
    assert main(["data", "inspect", mixed]) == 2
    err = capsys.readouterr().err
    assert "cannot tell the kind of dataset" in err and "fit pairs and video alike" in err
    assert "pass --kind pairs|video" in err and "Traceback" not in err

    unknown = write_jsonl(str(tmp_path / "unknown.jsonl"), [{"url": "x", "label": 3}, "{not json"])
    assert main(["data", "inspect", unknown]) == 2
    err = capsys.readouterr().err
    assert "fit none of interleaved, pairs, video" in err and "pass --kind interleaved|pairs|video" in err


def test_pack_without_kind_detects_it_as_inspect_does_and_says_so(tmp_path, capsys):
    """A video or document table packed without `--kind` is packed as what it holds (not read as pairs, every row
    `bad_record`); rows that fit no one kind end with exit code 2 asking for `--kind`."""
    clips = make_videos(str(tmp_path / "v"), 2, seconds=1, bad=False)
    assert main(["data", "pack", "--from", clips["path"], "--out", str(tmp_path / "vs")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "kind: video (detected from the files; --kind chooses)"
    assert out[1].startswith("packed 2 samples into 1 shard(s); skipped {}")

    docs = make_interleaved(str(tmp_path / "i"), 3, bad=False)
    assert main(["data", "pack", "--from", docs["path"], "--image-dir", docs["image_dir"],
                 "--out", str(tmp_path / "is")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kind: interleaved (detected") and "packed 3 samples" in out

    mixed = write_jsonl(str(tmp_path / "mixed.jsonl"), [{"image": "a.png", "caption": "a"},
                                                       {"video": "b.mp4", "caption": "b"}])
    assert main(["data", "pack", "--from", mixed, "--out", str(tmp_path / "ms")]) == 2
    err = capsys.readouterr().err
    assert "fit pairs and video alike" in err and "pass --kind pairs|video" in err
    assert not (tmp_path / "ms").exists()


def test_interleaved_pack_skips_documents_that_name_no_image(tmp_path, capsys):
    """`image_info: []` and URL-only entries (MMC4 rows not yet downloaded): the loader never reads such a document
    back, so pack counts it as `no_matched_image` and a pack of only such documents fails as an empty pack does."""
    url_only = {"text_list": ["x"], "image_info": [{"url": "http://x/y.jpg", "matched_text_index": 0,
                                                    "matched_sim": 0.5}]}
    table = write_jsonl(str(tmp_path / "d.jsonl"), [{"text_list": ["x"], "image_info": []}, url_only])
    assert main(["data", "pack", "--kind", "interleaved", "--from", table, "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "packed 0 samples" in captured.out and "{'no_matched_image': 2}" in captured.out
    assert "no sample could be packed" in captured.err
