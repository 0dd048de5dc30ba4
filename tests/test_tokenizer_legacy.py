"""`load_tokenizer`: a LLaMA-1-era tokenizer directory (its tokenizer.json's normalizer prepends `▁`) tokenizes as its
tokenizer.json says, as transformers 4 did and the converted models were trained with, on transformers 5 too (whose
`LlamaTokenizer` rebuilds the pipeline non-legacy: text after `<image>` would lose its word-start `▁`). The choice
survives saving the processor and loading it back."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
from transformers import AutoTokenizer

from flamingo.build import flamingo_processor
from flamingo.processing import FlamingoProcessor, load_tokenizer
from flamingo.runtime.compat import TRANSFORMERS
from flamingo.tiny import tiny_image_processor, tiny_tokenizer

TEXTS = ["<image>b cat<|endofchunk|>Answer", "<image> b  cat<|endofchunk|> Answer: yes", " hello world b"]
CORPUS = ["hello world, a cat and a dog.", "Answer: the cat is on the mat.", "b a c xyz Answer yes no"] * 20


def _llama_dir(directory, legacy):
    """A 2023 LLaMA-7B-style tokenizer directory: byte-fallback BPE, normalizer Prepend("▁") + Replace(" ", "▁"), no
    pre-tokenizer, BOS added; tokenizer_config.json with `legacy` as given ("absent": no key)."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(
        CORPUS,
        trainer=trainers.BpeTrainer(vocab_size=120, show_progress=False, special_tokens=["<unk>", "<s>", "</s>"]),
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 10**30,
        "tokenizer_class": "LlamaTokenizer",
    }
    if legacy != "absent":
        config["legacy"] = legacy
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _own(directory):
    """The tokenizer.json itself (transformers 4.54's fast tokenizer tokenizes as it does, whatever `legacy` says),
    with Flamingo's tokens added as `add_flamingo_tokens` adds them."""
    own = Tokenizer.from_file(str(directory / "tokenizer.json"))
    own.add_special_tokens(["<|endofchunk|>", "<image>"])
    return own


@pytest.mark.parametrize("legacy", ["absent", None, False, True])
def test_llama_era_tokenizer_tokenizes_as_its_file_says_and_keeps_it_saved(tmp_path, legacy):
    lm = _llama_dir(tmp_path / "lm", legacy)
    processor, _ = flamingo_processor(str(lm), tiny_image_processor(), max_frames=1, max_positions=None)
    own = _own(lm)
    for text in TEXTS:
        ids = processor.prompt_ids(text)
        assert ids == own.encode(text).ids, (text, processor.tokenizer.convert_ids_to_tokens(ids))
        assert processor.decode(ids, skip_special_tokens=False) == own.decode(ids, skip_special_tokens=False)
    # the text after <image> starts a word, as in training
    assert processor.tokenizer.convert_ids_to_tokens(processor.prompt_ids("<image>cat"))[2].startswith("▁")

    processor.save_pretrained(str(tmp_path / "saved"))
    if TRANSFORMERS >= (5, 0):  # the choice is saved: a plain AutoTokenizer reads it legacy too
        assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["legacy"] is True
        plain = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
        assert plain.convert_ids_to_tokens(plain("<image>cat")["input_ids"])[2].startswith("▁")
    loaded = FlamingoProcessor.from_pretrained(str(tmp_path / "saved"))
    for text in TEXTS:
        assert loaded.prompt_ids(text) == processor.prompt_ids(text), text


def test_other_tokenizers_load_as_transformers_loads_them(tmp_path):
    """A tokenizer.json without the `▁` prepending step (byte-level BPE here) is left as transformers reads it."""
    tiny_tokenizer().save_pretrained(str(tmp_path / "bpe"))
    ours, theirs = load_tokenizer(tmp_path / "bpe"), AutoTokenizer.from_pretrained(str(tmp_path / "bpe"))
    assert type(ours) is type(theirs)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()


# ----------------------------------------------------------------------------- SentencePiece-only LLaMA directories
def _sentencepiece_dir(directory, legacy, model: bytes = b"\x0e not a model"):
    """A LLaMA-1 directory as early-2023 conversions left it: `tokenizer.model` (SentencePiece) without tokenizer.json,
    tokenizer_config.json naming `LlamaTokenizer` with `legacy` as given ("absent": no key)."""
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(model)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "model_max_length": 2048,
    }
    if legacy != "absent":
        config["legacy"] = legacy
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_a_sentencepiece_only_directory_without_sentencepiece_names_the_packages(tmp_path, monkeypatch):
    """transformers reads a `tokenizer.model` with sentencepiece and protobuf; without them transformers 5 falls back
    to reading it as a tiktoken file and fails on its bytes. The error names the packages instead."""
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_sentencepiece_available", lambda: False)
    monkeypatch.setattr(transformers.utils, "is_protobuf_available", lambda: False)
    directory = _sentencepiece_dir(tmp_path / "llama", "absent")
    named = r"with the sentencepiece and protobuf packages: pip install 'flamingo-vlm\[convert\]' \(or pip install "
    with pytest.raises(ImportError, match=named + r"sentencepiece protobuf\)"):
        load_tokenizer(directory)


def test_a_sentencepiece_model_the_installed_pair_cannot_read_names_the_pair(tmp_path, monkeypatch):
    """With both packages installed but a pair that cannot read the model (sentencepiece 0.2.3 with protobuf below
    7.36.1), or a damaged model, transformers falls back to tiktoken: the error blamed a damaged tokenizer.json in a
    directory holding none. It names the model file, the two versions and the install that fixes the pair."""
    import importlib.metadata

    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_sentencepiece_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_protobuf_available", lambda: True)
    installed = {"sentencepiece": "0.2.3", "protobuf": "5.29.5"}
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed.get(name) or version(name))
    directory = _sentencepiece_dir(tmp_path / "llama", "absent")
    (directory / "tokenizer.model").write_bytes(b"\x0a\x05not a model")
    with pytest.raises(ValueError, match=r"cannot read the SentencePiece tokenizer.model in .* with sentencepiece "
                                         r"0.2.3 and protobuf 5.29.5: a damaged file, or a pair that cannot read it "
                                         r"\(pip install -U 'flamingo-vlm\[convert\]'"):
        load_tokenizer(directory)


@pytest.mark.skipif(TRANSFORMERS < (5, 0), reason="transformers 4 builds the legacy pipeline itself")
@pytest.mark.parametrize("legacy", ["absent", None, True, False])
def test_a_sentencepiece_only_llama_tokenizer_gets_the_legacy_pipeline(tmp_path, legacy):
    """What transformers 5 builds from a LLaMA `tokenizer.model` (a `LlamaTokenizer` on its vocabulary and merges,
    non-legacy `Metaspace`; the same tokenizer built here from a tokenizer.json's, so no sentencepiece is needed)
    gets the pipeline transformers 4 built from it unless the config says `legacy: false`: the ids of the
    tokenizer.json with the `▁`-prepending normalizer, text after special tokens starting a word."""
    from transformers import LlamaTokenizer

    from flamingo.processing import add_flamingo_tokens, restore_word_start_normalizer

    own_file = json.loads((_llama_dir(tmp_path / "json", "absent") / "tokenizer.json").read_text())["model"]
    tokenizer = LlamaTokenizer(
        vocab=own_file["vocab"],
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in own_file["merges"]],
    )
    restore_word_start_normalizer(tokenizer, str(_sentencepiece_dir(tmp_path / "sp", legacy)))
    add_flamingo_tokens(tokenizer)
    own = _own(tmp_path / "json")

    def ids(text):  # without BOS: the tokenizer built here has no post-processor
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    same = [ids(text) == own.encode(text, add_special_tokens=False).ids for text in TEXTS]
    if legacy is False:  # transformers 4 built it non-legacy too: left as transformers 5 reads it
        assert tokenizer.legacy is False and not all(same)
        return
    assert all(same), [tokenizer.convert_ids_to_tokens(ids(text)) for text in TEXTS]
    assert tokenizer.legacy is True and tokenizer.init_kwargs["legacy"] is True
    assert tokenizer.decode(
        tokenizer("<image>b cat<|endofchunk|>Answer")["input_ids"], skip_special_tokens=True
    ) == own.decode(own.encode("<image>b cat<|endofchunk|>Answer").ids)


def _trained_sentencepiece(spm) -> bytes:
    """A tiny SentencePiece BPE model with LLaMA's settings: byte fallback, a dummy prefix, no normalization (spaces
    kept as they are), `<unk>`, `<s>`, `</s>` as ids 0, 1, 2."""
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 5),
        model_writer=model,
        vocab_size=350,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return model.getvalue()


@pytest.mark.parametrize("legacy", ["absent", True])
def test_a_sentencepiece_only_llama_directory_tokenizes_as_sentencepiece(tmp_path, legacy):
    """Through the processor's loader, a `tokenizer.model`-only LLaMA directory gives SentencePiece's own ids for each
    text run between special tokens (what transformers 4 gave, and the LLaMA-1 models were trained on), also after
    saving the processor and loading it back."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model with protobuf")
    import re

    model = _trained_sentencepiece(spm)
    sp = spm.SentencePieceProcessor(model_proto=model)
    processor, _ = flamingo_processor(
        str(_sentencepiece_dir(tmp_path / "llama", legacy, model)),
        tiny_image_processor(),
        max_frames=1,
        max_positions=None,
    )
    special = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<|endofchunk|>")}

    def sentencepiece_ids(text):
        runs = re.split(r"(<image>|<\|endofchunk\|>)", text)
        return [sp.bos_id()] + [
            i for run in runs if run for i in ([special[run]] if run in special else sp.encode(run))
        ]

    texts = [*TEXTS, "Answer: the cat<image>a dog", "<image>User: 12 cats<|endofchunk|>"]
    for text in texts:
        ids = processor.prompt_ids(text)
        assert ids == sentencepiece_ids(text), (text, processor.tokenizer.convert_ids_to_tokens(ids))
    processor.save_pretrained(str(tmp_path / "saved"))
    loaded = FlamingoProcessor.from_pretrained(str(tmp_path / "saved"))
    assert [loaded.prompt_ids(t) for t in texts] == [processor.prompt_ids(t) for t in texts]
