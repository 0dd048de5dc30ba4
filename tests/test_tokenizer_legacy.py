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
