"""`load_processor(source)`: the processor `load_model(source)` returns, for every family `--model` takes (a model
saved here, an IDEFICS directory or its PEFT adapter, an Otter repository, a published OpenFlamingo name), built from
configs and tokenizer files alone: each is loaded from a copy of the checkpoint without its weight files, and a Hub
name fetches no weights."""

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_idefics_equal import IdeficsImageProcessorPil, save_peer

from flamingo.build import load_pretrained
from flamingo.convert.auto import load_model, load_processor
from flamingo.runtime.compat import TRANSFORMERS
from flamingo.tiny import random_image, tiny_flamingo

WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
PROMPT = "Intro <image>Question: what is it? Answer: red.<|endofchunk|><image>Question: and this?"
IDEFICS_PROMPT = "User:<image>What is in this image?<end_of_utterance>\nAssistant:"


def without_weights(source: Path, target: Path) -> Path:
    """A copy of the checkpoint directory `source` without its weight files."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*WEIGHTS))
    assert not [p for p in target.rglob("*") if any(fnmatch.fnmatch(p.name, w) for w in WEIGHTS)]
    return target


def assert_same_processor(got, expected, prompt: str = PROMPT) -> None:
    """The same tokens, settings and model inputs for a prompt with images."""
    a, b = got.tokenizer, expected.tokenizer
    assert a.get_vocab() == b.get_vocab() and len(a) == len(b)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "all_special_ids", "model_max_length"):
        assert getattr(a, attr) == getattr(b, attr), attr
    for attr in ("max_length", "max_frames", "template", "padding_side", "image_references", "num_references",
                 "media_token_id", "media_marker_ids"):
        assert getattr(got, attr) == getattr(expected, attr), attr
    assert type(got.image_processor) is type(expected.image_processor)
    assert got.image_processor.to_dict() == expected.image_processor.to_dict()
    media = [random_image(0), random_image(1)][:prompt.count("<image>")]
    ours, theirs = got(prompt, images=media), expected(prompt, images=media)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] is None and theirs[key] is None) or torch.equal(ours[key], theirs[key]), key


@pytest.fixture(scope="module")
def idefics_dir(tmp_path_factory):
    return save_peer(tmp_path_factory.mktemp("idefics") / "idefics", "vector", True)


def test_a_model_saved_here(tmp_path):
    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "ours"), processor=processor)
    got = load_processor(without_weights(tmp_path / "ours", tmp_path / "bare"))
    assert_same_processor(got, load_pretrained(str(tmp_path / "ours"))[1])


@pytest.mark.parametrize("preprocessor", [False, True])
def test_an_idefics_directory(idefics_dir, tmp_path, preprocessor):
    """With IDEFICS's default preprocessing, and with the directory's own `preprocessor_config.json`."""
    source = tmp_path / "idefics"
    shutil.copytree(idefics_dir, source)
    if preprocessor:
        IdeficsImageProcessorPil(image_size=32, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(source)
    got = load_processor(without_weights(source, tmp_path / "bare"))
    expected = load_model(source)[1]
    assert expected.template == "idefics" and expected.max_length == 128  # the LM's positions bound the tokenizer's
    assert_same_processor(got, expected, IDEFICS_PROMPT)
    mean = [0.5] * 3 if preprocessor else [0.48145466, 0.4578275, 0.40821073]  # the directory's, or IDEFICS's
    assert list(got.image_processor.image_mean) == pytest.approx(mean)


def test_an_idefics_adapter_gives_its_bases_processor(tmp_path):
    pytest.importorskip("peft", reason="IDEFICS adapters need peft")
    from test_idefics_adapters import _adapted

    _adapted(tmp_path)  # tmp_path/base, and tmp_path/adapter whose config names it
    expected = load_model(tmp_path / "adapter")[1]
    base = without_weights(tmp_path / "base", tmp_path / "bare-base")
    adapter = without_weights(tmp_path / "adapter", tmp_path / "bare-adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    assert_same_processor(load_processor(adapter), expected, IDEFICS_PROMPT)
    config.pop("base_model_name_or_path")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names no base model"):
        load_processor(adapter)


OTTER_CASES = {  # name: (LM, Otter's class, frames, the repository ships its tokenizer and preprocessor config)
    "llama": ("llama", "otter", None, False),  # the base tokenizer its LM's _name_or_path names
    "mpt-own-files": ("mpt", "otter", None, True),  # MPT: no positions in transformers' config
    "video": ("llama", "otter", 3, False),  # frame embeddings: max_frames from the config
    "openflamingo-format": ("llama", "flamingo", None, False),
}


@pytest.mark.parametrize("case", list(OTTER_CASES))
def test_an_otter_repository(tmp_path, monkeypatch, case):
    pytest.importorskip("otter_ai", reason="otter-ai is not installed")
    from test_otter_equal import OtterConfig, OtterFlamingoConfig, _reference

    from flamingo.tiny import tiny_image_processor

    if TRANSFORMERS < (5, 0):  # the peer's save: transformers 4 diffs a config against `type(config)()`, which
        for config in (OtterConfig, OtterFlamingoConfig):  # Otter's refuse (KeyError 'model_type'); their
            monkeypatch.setattr(config, "has_no_defaults_at_init", True)  # `is_composition` is this flag's old name
            monkeypatch.setattr(config, "_get_non_default_generation_parameters", lambda self: {})
    lm, kind, frames, own = OTTER_CASES[case]
    _, source, tok_dir = _reference(tmp_path, monkeypatch, lm, frames=frames, kind=kind)
    if own:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(source)
        tiny_image_processor("clip").save_pretrained(source)
    expected = load_model(source)[1]
    assert expected.max_frames == (frames or 8) and expected.template == ("otter" if kind == "otter" else "flamingo")
    got = load_processor(without_weights(source, tmp_path / "bare"))
    assert_same_processor(got, expected, PROMPT.replace("Answer:", "GPT:<answer>") if kind == "otter" else PROMPT)


@pytest.mark.parametrize("lm_kind", ["llama", "mpt", "mosaic_gpt"])
def test_a_published_openflamingo_name(tmp_path, monkeypatch, lm_kind):
    """A published name's backbones are hub names (`PUBLISHED`), here directories; its checkpoint is never fetched."""
    pytest.importorskip("einops_exts", reason="the OpenFlamingo peer needs einops-exts")
    import huggingface_hub

    from flamingo.convert.openflamingo import PUBLISHED

    from helpers import openflamingo_peer, write_openflamingo_files

    args = write_openflamingo_files(*openflamingo_peer(2, lm_kind=lm_kind), tmp_path)
    checkpoint, vision, lm = args[1], Path(args[3]), Path(args[5])
    name = "openflamingo/OpenFlamingo-tiny"
    monkeypatch.setitem(PUBLISHED, name, (str(vision), str(lm)))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, file, **_: checkpoint)
    expected = load_model(name)[1]

    def refuse(*args, **kwargs):
        raise AssertionError("the processor fetched the checkpoint")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setitem(PUBLISHED, name, (str(without_weights(vision, tmp_path / "bare-vision")),
                                          str(without_weights(lm, tmp_path / "bare-lm"))))
    assert_same_processor(load_processor(name), expected)


def test_a_hub_name_fetches_configs_and_tokenizer_files_only(idefics_dir, tmp_path, monkeypatch):
    """A Hub repository (served here from directories) is fetched with patterns that leave its weights out."""
    import huggingface_hub

    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "ours"), processor=processor)
    remote = {"org/idefics": idefics_dir, "org/ours": tmp_path / "ours"}

    def snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, repo_type="model"):
        local = tmp_path / "cache" / repo_id.replace("/", "--")
        for path in remote[repo_id].rglob("*"):
            if path.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(path.name, p)
                                                                 for p in allow_patterns)):
                (local / path.relative_to(remote[repo_id])).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, local / path.relative_to(remote[repo_id]))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert_same_processor(load_processor("org/idefics"), load_model(idefics_dir)[1], IDEFICS_PROMPT)
    assert_same_processor(load_processor("org/ours"), processor)
    fetched = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert "tokenizer.json" in fetched and not [n for n in fetched if n.endswith(".safetensors")]


def test_eval_through_a_server_refuses_what_needs_files_the_user_names(capsys):
    """OpenFlamingo v1 sits on a LLaMA-7B the user names: refused before any request, saying what to do."""
    from flamingo.cli import main

    assert main(["eval", "--model", "med-flamingo/med-flamingo", "--server", "http://127.0.0.1:9", "--task", "vqa",
                 "--data", "unused"]) == 2
    assert "--lm" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["directory", "hub"])
def test_load_model_refuses_a_model_saved_without_its_processor_before_fetching_its_weights(tmp_path, monkeypatch,
                                                                                            where):
    """`--model` of a model saved without its processor is refused from its configs: a Hub repository's weights are
    never downloaded (the hub is served here from a directory, recording what is fetched)."""
    import huggingface_hub

    model, _ = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "bare"))  # processor=None, the default
    fetched: list[str] = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, repo_type="model"):
        local = tmp_path / "cache" / repo_id.replace("/", "--")
        local.mkdir(parents=True, exist_ok=True)
        for path in (tmp_path / "bare").iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(path.name, p) for p in allow_patterns):
                shutil.copy(path, local / path.name)
                fetched.append(path.name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    source = str(tmp_path / "bare") if where == "directory" else "org/bare"
    with pytest.raises(ValueError, match="saved without its processor.*processor=processor"):
        load_model(source)
    assert not [n for n in fetched if any(fnmatch.fnmatch(n, w) for w in WEIGHTS)]


def test_a_directory_without_tokenizer_files_is_refused_naming_it(tmp_path, capsys):
    """An LM saved by `save_pretrained` alone (a saved Flamingo's `lm/` too) holds no tokenizer: a ValueError naming
    the directory and what to pass, not transformers' advice to install sentencepiece or tiktoken; `flamingo train`
    with it as model.lm exits 2 with that message."""
    import re

    import yaml

    from flamingo.cli import main
    from flamingo.processing import load_tokenizer
    from flamingo.tiny import tiny_image_processor, tiny_lm, tiny_vision

    lm, vision = str(tmp_path / "lm"), str(tmp_path / "vision")
    tiny_lm().save_pretrained(lm)
    tiny_vision().save_pretrained(vision)
    tiny_image_processor().save_pretrained(vision)
    with pytest.raises(ValueError, match=rf"no tokenizer files in '{re.escape(lm)}'.*model.tokenizer / --tokenizer.*"
                                         "model.init_from / --model"):
        load_tokenizer(lm)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"vision": vision, "lm": lm, "flamingo": {"num_latents": 4, "resampler_depth": 1}},
        "data": [{"name": "pairs", "kind": "pairs", "path": str(tmp_path / "unread.jsonl"), "batch_size": 1}],
        "train": {"steps": 1, "output_dir": str(tmp_path / "run"), "progress": False}}))
    assert main(["train", str(config)]) == 2
    assert f"flamingo: error: no tokenizer files in '{lm}'" in capsys.readouterr().err
