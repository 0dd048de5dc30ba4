"""A command that needs a package of an extra that is not installed ends in one `flamingo: error: ...` line naming
the package and the extra (exit code 2), whichever layer finds it missing: a video (PyAV), `lm_lora` (peft),
`optim.kind=adamw8bit` (torchao), a SentencePiece-only tokenizer (sentencepiece, protobuf). An ImportError without
that hint is a broken install and keeps its traceback. A package that is None in sys.modules raises
ModuleNotFoundError on import, as a missing one."""

from __future__ import annotations

import json
import sys

import pytest

import flamingo.video
from flamingo.cli import main
from flamingo.tiny import random_image, tiny_flamingo

from train_fixtures import save_backbones, train_config, write_datasets


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("flamingo: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny Flamingo, a clip (bytes PyAV is never asked to read) and a JSONL of it as a video dataset."""
    root = tmp_path_factory.mktemp("saved")
    model, processor = tiny_flamingo()
    model.save_pretrained(str(root / "model"), processor=processor)
    (root / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (root / "vids.jsonl").write_text(json.dumps({"video": str(root / "clip.mp4"), "caption": "a thing moves"}) + "\n")
    return root


VIDEO = "flamingo: error: videos need PyAV (av): pip install 'flamingo-vlm[video]'"


def test_a_video_without_pyav_is_one_line_from_generate_and_data_inspect(saved, monkeypatch, capsys):
    for name in ["av", *(m for m in sys.modules if m.startswith("av."))]:
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["generate", "--model", str(saved / "model"), "--prompt", "<image>hi", "--image",
                 str(saved / "clip.mp4"), "--max-new-tokens", "2"]) == 2
    assert _error_line(capsys) == VIDEO
    assert main(["data", "inspect", str(saved / "vids.jsonl"), "--kind", "video", "--tokenizer-from",
                 str(saved / "model")]) == 2
    assert _error_line(capsys) == VIDEO


def test_an_import_error_of_a_broken_install_keeps_its_traceback(saved, monkeypatch):
    """A package that is there but broken (a name it lacks) is no extra to install: its traceback says where."""
    def broken():
        raise ImportError("cannot import name 'VideoFrame' from 'av'")

    monkeypatch.setattr(flamingo.video, "import_av", broken)
    with pytest.raises(ImportError, match="cannot import name 'VideoFrame'"):
        main(["generate", "--model", str(saved / "model"), "--prompt", "<image>hi", "--image",
              str(saved / "clip.mp4"), "--max-new-tokens", "2"])


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    vision, lm = save_backbones(str(root))
    return root, vision, lm, write_datasets(str(root / "data"), n_pairs=4, n_docs=2)


@pytest.mark.parametrize("module, overrides, message", [
    ("peft", ["model.flamingo.lm_lora={r: 2, alpha: 4, target_modules: [q_proj, v_proj]}"],
     "lm_lora needs peft: pip install 'flamingo-vlm[memory]'"),
    ("torchao", ["optim.kind=adamw8bit"], "optim.kind=adamw8bit needs torchao: pip install 'flamingo-vlm[memory]'"),
])
def test_training_without_an_extra_is_one_line(backbones, tmp_path, monkeypatch, capsys, module, overrides, message):
    root, vision, lm, data = backbones
    config = train_config(str(tmp_path), vision, lm, data, steps=1, out=str(tmp_path / "run"), interleaved=False)
    for name in [module, *(m for m in sys.modules if m.startswith(module + "."))]:  # imported by another test
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["train", config, *overrides]) == 2
    assert _error_line(capsys) == f"flamingo: error: {message}"


def test_a_sentencepiece_tokenizer_without_sentencepiece_is_one_line(saved, tmp_path, monkeypatch, capsys):
    """A LLaMA-1-era directory: SentencePiece's tokenizer.model and no tokenizer.json, read here as if neither
    sentencepiece nor protobuf were installed."""
    import transformers.utils

    directory = tmp_path / "sptok"
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(b"not a model")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    monkeypatch.setattr(transformers.utils, "is_sentencepiece_available", lambda: False)
    monkeypatch.setattr(transformers.utils, "is_protobuf_available", lambda: False)
    random_image(0).save(tmp_path / "a.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": str(tmp_path / "a.png"), "caption": "a cat"}) + "\n")
    assert main(["data", "inspect", str(tmp_path / "pairs.jsonl"), "--kind", "pairs", "--tokenizer-from",
                 str(directory)]) == 2
    line = _error_line(capsys)
    assert "sentencepiece and protobuf packages: pip install 'flamingo-vlm[convert]'" in line
