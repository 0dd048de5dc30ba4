"""`flamingo data inspect` / `flamingo data pack`: counts, contact sheet, shards the loader reads back."""

import json
import os
import warnings

from PIL import Image

from flamingo.cli import main
from flamingo.data import build_source
from flamingo.data.fixtures import make_interleaved, make_pairs, make_videos, tiny_processor
from flamingo.data.inspect import inspect_dataset
from flamingo.train.config import DatasetSection


def test_inspect_counts_and_contact_sheet(tmp_path, capsys):
    data = make_pairs(str(tmp_path / "p"), 5)
    processor_dir = tmp_path / "proc"
    tiny_processor().save_pretrained(str(processor_dir))
    out = tmp_path / "report"
    assert main(["data", "inspect", data["path"], "--kind", "pairs", "--tokenizer-from", str(processor_dir),
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 5 and summary["media"] == 5 and summary["frames"] == 5
    assert summary["records"] == 9 and summary["skipped"] == data["bad"]
    assert summary["tokens"] > 5 * 3
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 100 and sheet.size[1] > 100


def test_inspect_without_tokenizer_interleaved_and_video(tmp_path):
    docs = make_interleaved(str(tmp_path / "i"), 3)
    report = inspect_dataset(docs["path"], "interleaved", options={"image_dir": docs["image_dir"]})
    assert (report.samples, report.media, report.tokens) == (3, 6, None)
    assert report.skipped == docs["bad"]
    clips = make_videos(str(tmp_path / "v"), 2, seconds=3)
    report = inspect_dataset(clips["path"], "video", options={"max_frames": 2})
    assert (report.samples, report.media, report.frames) == (2, 2, 4) and report.skipped == clips["bad"]


def test_pack_pairs_and_interleaved_then_load(tmp_path, capsys):
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
    assert main(["data", "pack", "--kind", "interleaved", "--from", docs["path"], "--image-dir", docs["image_dir"],
                 "--out", str(tmp_path / "is" / "docs-%04d.tar"), "--shard-size", "3"]) == 0
    shards = sorted(os.listdir(tmp_path / "is"))
    assert shards == ["docs-0000.tar", "docs-0001.tar", "docs-0002.tar"]
    src = build_source(DatasetSection("i", "interleaved", str(tmp_path / "is"), 1), processor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(src)
    assert len(batches) == 4 and all(int(b["num_media"][0]) == 2 for b in batches)
    assert src.skipped == {"empty_text": 1, "missing_file": 1, "no_matched_image": 1}


def test_pack_image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(folder / f"im{i}.jpg")
        (folder / f"im{i}.txt").write_text(f"red level {i}")
    from flamingo.data.pack import pack

    result = pack(str(tmp_path / "out"), images=str(folder), shard_size=10)
    assert result["samples"] == 3 and len(result["shards"]) == 1
