"""`flamingo data inspect`'s contact sheet: the text it draws beside each shown sample, or in place of them."""

from flamingo.data.fixtures import make_pairs, write_jsonl
from flamingo.data.inspect import InspectReport, contact_sheet, inspect_dataset, sheet_labels


def test_the_sheet_labels_each_shown_sample_or_says_why_none_is_drawn(tmp_path):
    """A shown sample is labelled with its record key and the text it trains on, wrapped and cut to its row; with none
    shown, `--show 0` over good samples says how many were left undrawn, which a dataset without one does not."""
    data = make_pairs(str(tmp_path / "p"), 3)
    shown = inspect_dataset(data["path"], "pairs", show=2)
    assert sheet_labels(shown) == [
        "pairs.jsonl:1: <image>photo 0<|endofchunk|>",  # file:line, as an editor counts lines
        "pairs.jsonl:2: <image>photo 1<|endofchunk|>",
    ]
    assert sheet_labels(inspect_dataset(data["path"], "pairs", show=0)) == [
        "none of the 3 good samples drawn (--show 0)"
    ]
    write_jsonl(str(tmp_path / "bad.jsonl"), [{"image": "missing.png", "caption": "gone"}])
    assert sheet_labels(inspect_dataset(str(tmp_path / "bad.jsonl"), "pairs", show=2)) == ["no good samples"]

    long = InspectReport("pairs", 1, samples=1, shown=[("k: " + "word " * 100, [])])
    label = sheet_labels(long, thumb=36)[0]  # 36-pixel rows: three 12-pixel lines of at most 80 columns
    assert len(label.splitlines()) == 3 and all(len(line) <= 80 for line in label.splitlines())
    assert label.startswith("k: word word")
    assert contact_sheet(long, str(tmp_path / "sheet.png"), thumb=36) == str(tmp_path / "sheet.png")
