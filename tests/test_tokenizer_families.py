"""Tokenizer families and the contracts the processor keeps with each: tiny tokenizers of the families real LMs use
(byte-level BPE with Llama-3's digit split, LLaMA's byte-fallback BPE with a Metaspace pre-tokenizer), built and
saved offline, then read as a model directory's are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from flamingo.build import flamingo_processor, from_backbones
from flamingo.chat import Turn, chat_format_for
from flamingo.config import END_OF_UTTERANCE, IDEFICS_IMAGE_WRAPPER
from flamingo.data.sequence import IGNORE_INDEX, make_labels
from flamingo.data.sources import read_records
from flamingo.data.spec import DatasetSpec
from flamingo.detokenize import IncrementalText
from flamingo.eval.remote import decoded_alone
from flamingo.processing import FlamingoProcessor, appended_special_ids
from flamingo.tiny import (
    random_image,
    tiny_flamingo_config,
    tiny_image_processor,
    tiny_lm,
    tiny_tokenizer,
    tiny_vision,
)

CORPUS = ["How many? 2 cats and 3 dogs, 12 birds. Answer: 2", "hello world, a cat and a dog.",
          "Question: what is this? Short answer: a red circle.", "And now? yes no left right"] * 20
# Llama-3's (and Qwen2's) pre-tokenizer: digits split off in runs of up to 3, without the space before them
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# the formats' own markers, added after <image> as the converters add them
EXTRA = {"flamingo": (), "otter": ("<answer>",), "idefics": (IDEFICS_IMAGE_WRAPPER, END_OF_UTTERANCE), "mmgpt": ()}


def _write(directory: Path, tok: Tokenizer, config: dict) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return str(directory)


def llama3_style(directory: Path) -> str:
    """Byte-level BPE split as Llama-3's: ` 2` is `Ġ`, `2` (no token holds a digit with its space)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return _write(directory, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                                   "eos_token": "<|end_of_text|>", "model_max_length": 1024})


def llama_style(directory: Path, *, legacy: bool = False, add_eos: bool = False, prepend: bool = False) -> str:
    """LLaMA-1/2's layout: byte-fallback BPE (ids 3-258 the bytes), Metaspace, `<s>` first; ` 2` is `▁`, `<0x32>`.
    add_eos: the tokenizer also appends `</s>` (`add_eos_token`); prepend: LLaMA-1-era pipeline instead (normalizer
    Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer)."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator([line.replace("2", "") for line in CORPUS], trainer=trainers.BpeTrainer(
        vocab_size=200, show_progress=False, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    spec["model"]["vocab"] = vocab
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    if prepend:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A" + (" </s>" if add_eos else ""),
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    return _write(directory, tok, {"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True,
                                   "add_eos_token": add_eos, "bos_token": "<s>", "eos_token": "</s>",
                                   "unk_token": "<unk>", "model_max_length": 10**30})


def t5_style(directory: Path) -> str:
    """Unigram + Metaspace as T5's: no BOS, `</s>` appended after every text."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS, trainer=trainers.UnigramTrainer(
        vocab_size=120, show_progress=False, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return _write(directory, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>",
                                   "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 512})


def bert_style(directory: Path) -> str:
    """WordPiece as BERT's: `[CLS]` first, `[SEP]` appended after every text, no EOS."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainer=trainers.WordPieceTrainer(
        vocab_size=150, show_progress=False, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return _write(directory, tok, {"tokenizer_class": "BertTokenizer", "pad_token": "[PAD]", "unk_token": "[UNK]",
                                   "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
                                   "model_max_length": 512})


FAMILIES = {"llama3": llama3_style, "llama": llama_style}
APPENDING = {"llama_add_eos": lambda d: llama_style(d, add_eos=True), "t5": t5_style, "bert": bert_style}


def _processor(path: str, template: str = "flamingo"):
    processor, _ = flamingo_processor(path, tiny_image_processor(), max_frames=1, max_positions=None,
                                      extra_tokens=EXTRA[template], template=template)
    return processor


@pytest.mark.parametrize("template", ["flamingo", "otter", "idefics", "mmgpt"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_answer_whose_gap_is_a_token_of_its_own_trains_it(tmp_path, family, template):
    """A digit answer on LLaMA's or Llama-3's vocabulary starts with a lone space token (` 2` is `▁`, `2`), which the
    served prompt ends before: chat training labels it, so that each served prompt followed by the training targets
    is the training sequence."""
    processor = _processor(FAMILIES[family](tmp_path / family), template)
    tok, fmt = processor.tokenizer, chat_format_for(processor)
    random_image(0).save(tmp_path / "0.png")
    turns = [Turn("user", ("<image>", "How many?")), Turn("assistant", ("2",)), Turn("user", ("And now?",)),
             Turn("assistant", ("12 cats.",))]
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "0.png"},
                                                     {"type": "text", "text": "How many?"}]},
                        {"role": "assistant", "content": "2"}, {"role": "user", "content": "And now?"},
                        {"role": "assistant", "content": "12 cats."}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(row) + "\n")
    spec = DatasetSpec.create("chat", "chat", str(tmp_path / "chat.jsonl"), 1, {}, processor)
    (sample,) = [spec.encode(record) for record in read_records(str(tmp_path / "chat.jsonl"))]
    ids, labels = sample.input_ids, sample.labels
    starts = []
    for k in (1, 3):  # each answer: what the server sends before it is the sample's beginning, then its targets
        served = processor.prompt_ids(fmt.render(turns[:k]))
        assert ids[:len(served)] == served
        end = next((t for t in range(len(served), len(ids)) if labels[t] == IGNORE_INDEX), len(ids))
        assert labels[len(served):end] == ids[len(served):end] and end > len(served)
        assert tok.decode(ids[len(served):end]).strip().startswith(turns[k].pieces[0])
        assert all(label == IGNORE_INDEX for label in labels[starts[-1][1] if starts else 0:len(served)])
        starts.append((len(served), end))
    if template != "mmgpt":  # the case in point: the first answer's first token is the gap alone
        assert tok.convert_ids_to_tokens(ids[starts[0][0]]) in ("Ġ", "▁")


@pytest.mark.parametrize("family", sorted(APPENDING))
def test_a_prompt_never_ends_with_what_the_tokenizer_appends(tmp_path, family):
    """LLaMA's `add_eos_token`, T5's `</s>`, BERT's `[SEP]`: the model is asked to continue right after the prompt's
    text (generation, eval, ranked scoring and the server all read `prompt_ids`), never after an EOS."""
    processor = _processor(APPENDING[family](tmp_path / family))
    tok = processor.tokenizer
    appended = tok("a cat")["input_ids"][-1]
    assert appended in (tok.eos_token_id, tok.sep_token_id)
    text = "<image>Output: a cat.<|endofchunk|><image>Output:"
    lead = [tok.bos_token_id or tok.cls_token_id] if family != "t5" else []
    plain = processor.token_ids(text, special_tokens=False)
    assert processor.prompt_ids(text) == lead + plain
    batch = processor(text, images=[random_image(0), random_image(1)])
    assert batch["input_ids"][0].tolist() == lead + plain
    assert processor.prompt_ids("") == lead and processor.appended_ids == (appended,)


@pytest.mark.parametrize("family", ["llama_add_eos", "t5"])
def test_a_training_sequence_ends_with_one_eos_and_trains_no_eos_text(tmp_path, family):
    """Pairs end with the EOS the data writes (`append_eos`): one EOS token, the sequence's last and a target, and
    never the characters of `</s>` trained as text before a second one."""
    processor = _processor(APPENDING[family](tmp_path / family))
    tok = processor.tokenizer
    random_image(0).save(tmp_path / "0.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "0.png", "caption": "A cat."}) + "\n")
    spec = DatasetSpec.create("pairs", "pairs", str(tmp_path / "pairs.jsonl"), 1, {}, processor)
    (sample,) = [spec.encode(record) for record in read_records(str(tmp_path / "pairs.jsonl"))]
    ids = sample.input_ids
    assert sample.text.endswith("<|endofchunk|></s>")
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert ids[-2] == processor.end_of_chunk_token_id
    assert sample.labels == make_labels(ids, processor.media_token_id) and sample.labels[-1] == tok.eos_token_id


def _build(tok):
    return from_backbones(tiny_vision(), tiny_lm("llama", vocab_size=len(tok)), tok, tiny_flamingo_config(),
                          image_processor=tiny_image_processor())


@pytest.mark.parametrize("held", ["special", "plain added"])
def test_a_tokenizer_already_holding_a_flamingo_token_in_the_lms_rows_builds_and_says_so(held, caplog):
    """Not added at the build, `<image>` / `<|endofchunk|>` read the LM's own row (a converted Otter's tokenizer, whose
    table holds its trained rows; a token the LM reserves, as PaliGemma's Gemma does): the build takes it and says
    the row is the LM's, frozen. As a plain added token `<|endofchunk|>` was decoded into every answer's text: the
    processor's decode leaves the markers out whatever the tokenizer says."""
    tok = tiny_tokenizer()
    if held == "special":
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    else:
        tok.add_tokens(["<image>", "<|endofchunk|>"])
    rows = len(tok)  # the LM's table (`_build`)
    with caplog.at_level("WARNING", logger="flamingo.build"):
        model, processor = _build(tok)
    assert model.config.media_token_id == 300
    assert f"already holds <image> at id 300, among the LM's {rows} embedding rows" in caplog.text
    assert "the model reads the LM's own row for it" in caplog.text
    answer = tok("a cat", add_special_tokens=False)["input_ids"] + [model.config.end_of_chunk_token_id]
    assert processor.decode(answer) == processor.batch_decode([answer])[0] == "a cat"


def test_a_tokenizer_holding_image_as_a_plain_vocabulary_entry_is_refused():
    """`<image>` in the BPE vocabulary itself: the text reads it as `<`, `image`, `>`, so no prompt could place an
    image; refused where the processor is made, naming the token and the cause."""
    spec = json.loads(tiny_tokenizer().backend_tokenizer.to_str())
    spec["model"]["vocab"]["<image>"] = len(spec["model"]["vocab"])
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match=r"holds <image> \(id 300\) as a plain entry of its vocabulary, not an added "
                                         r"token: its text reads as \['<', .*pass the LM's own tokenizer"):
        flamingo_processor(tok, tiny_image_processor(), max_frames=1, max_positions=None)
    with pytest.raises(ValueError, match="as a plain entry of its vocabulary"):
        _build(tok)


def test_a_tokenizer_that_splits_special_tokens_still_reads_the_processors_markers(tmp_path):
    """A tokenizer saved with `split_special_tokens: true` (text never read as special tokens): the processor's own
    markers are tokens in its prompts and training sequences, as with any other tokenizer."""
    directory = llama3_style(tmp_path / "split")
    config = json.loads((tmp_path / "split" / "tokenizer_config.json").read_text())
    (tmp_path / "split" / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": True}))
    processor = _processor(directory)
    assert processor.tokenizer.split_special_tokens
    text = "<image>Output: a cat.<|endofchunk|><image>Output:"
    ids = processor(text, images=[random_image(0), random_image(1)])["input_ids"][0].tolist()
    assert ids.count(processor.media_token_id) == 2 and ids.count(processor.end_of_chunk_token_id) == 1
    random_image(0).save(tmp_path / "0.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "0.png", "caption": "A cat."}) + "\n")
    spec = DatasetSpec.create("pairs", "pairs", str(tmp_path / "pairs.jsonl"), 1, {}, processor)
    (sample,) = [spec.encode(record) for record in read_records(str(tmp_path / "pairs.jsonl"))]
    eos = processor.tokenizer.eos_token_id
    assert sample.input_ids[-3:] == [processor.tokenizer.convert_tokens_to_ids("."), processor.end_of_chunk_token_id,
                                     eos]
    assert sample.input_ids[1] == processor.media_token_id


@pytest.mark.parametrize("legacy", [True, False])
def test_a_legacy_llama_tokenizer_with_a_metaspace_file_tokenizes_as_its_file_before_and_after_saving(tmp_path,
                                                                                                      legacy):
    """`legacy: true` and a tokenizer.json whose `Metaspace` adds no `▁` after a special token: transformers 5's
    `LlamaTokenizer` builds one that does, and saves it without `legacy`, so the text after every `<image>` changed
    between the model as trained and as loaded back. The file's pipeline is kept, and survives the save."""
    directory = llama_style(tmp_path / "llama", legacy=legacy)
    processor = _processor(directory)
    own = Tokenizer.from_file(f"{directory}/tokenizer.json")
    own.add_special_tokens(["<|endofchunk|>", "<image>"])
    processor.save_pretrained(str(tmp_path / "saved"))
    loaded = FlamingoProcessor.from_pretrained(str(tmp_path / "saved"))
    for text in ["<image>b cat", "x<|endofchunk|><image>yes", "<image> b  cat", " hello world"]:
        assert processor.prompt_ids(text) == own.encode(text).ids == loaded.prompt_ids(text), text
    assert processor.tokenizer.convert_ids_to_tokens(processor.prompt_ids("<image>yes"))[2] == "yes"


def test_a_float_model_max_length_is_the_processors_integer_limit(tmp_path):
    """`"model_max_length": 256.0` (a JSON writer's float): the processor's limit is 256, which it saves and loads
    back, not a value that builds, trains and fails at the first save."""
    directory = llama3_style(tmp_path / "float")
    config = json.loads((tmp_path / "float" / "tokenizer_config.json").read_text())
    (tmp_path / "float" / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 256.0}))
    model, processor = from_backbones(tiny_vision(), tiny_lm("llama", vocab_size=320), directory,
                                      tiny_flamingo_config(), image_processor=tiny_image_processor())
    assert processor.max_length == 256 and isinstance(processor.max_length, int)
    model.save_pretrained(str(tmp_path / "saved"), processor=processor)
    assert FlamingoProcessor.from_pretrained(str(tmp_path / "saved")).max_length == 256


REMOTE_FAMILIES = {"llama3": llama3_style, "llama": llama_style, "llama_legacy": lambda d: llama_style(d, legacy=True),
                   "llama1_prepend": lambda d: llama_style(d, prepend=True), "t5": t5_style, "bert": bert_style}


@pytest.mark.parametrize("family", sorted(REMOTE_FAMILIES))
def test_a_served_answer_is_recorded_as_the_in_process_one(tmp_path, family):
    """`eval --server` records the server's completion text (its tokens decoded after the prompt, which keeps the
    space a SentencePiece answer starts with) as `predict.generate_batch` decodes the same tokens alone."""
    processor = _processor(REMOTE_FAMILIES[family](tmp_path / family))
    for prompt, answer in (("Q:", " yes it is"), ("Q:", " 12 cats"), ("Q:", "yes"), ("Q:", "\nno")):
        head = processor.token_ids(prompt, special_tokens=False)
        whole = processor.token_ids(prompt + answer, special_tokens=False)
        assert whole[:len(head)] == head
        generated = whole[len(head):]  # what the model writes after the prompt
        served = IncrementalText(processor)
        for token in generated:
            served.add(token)
        served.flush()
        assert decoded_alone(processor, served.text) == processor.batch_decode([generated])[0], (answer, served.text)


def test_what_a_tokenizer_appends_is_read_off_a_text_it_encodes():
    """A tokenizer that writes nothing for the probe text appends nothing the processor could tell apart: none is
    dropped (its BOS would be)."""
    class Silent:
        def __call__(self, text, add_special_tokens, verbose):
            return {"input_ids": [7, 8] if add_special_tokens else []}

    assert appended_special_ids(Silent()) == ()
    assert appended_special_ids(tiny_tokenizer()) == ()


def test_idefics_processor_takes_a_float_model_max_length_as_an_integer(tmp_path):
    """IDEFICS's processor bounds max_length by the tokenizer's model_max_length itself: a float there (256.0, as
    some JSON writers store it) was refused as 'max_length must be an integer'."""
    from transformers import IdeficsConfig

    from flamingo.convert.idefics import idefics_processor
    from flamingo.processing import load_tokenizer

    directory = llama3_style(tmp_path / "idefics")
    config = json.loads((tmp_path / "idefics" / "tokenizer_config.json").read_text())
    (tmp_path / "idefics" / "tokenizer_config.json").write_text(json.dumps(
        {**config, "model_max_length": 256.0, "pad_token": "<|end_of_text|>"}))
    tok = load_tokenizer(str(directory))
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>"]})
    idefics = IdeficsConfig(vocab_size=len(tok), additional_vocab_size=0, max_position_embeddings=2048)
    processor = idefics_processor(idefics, None, tokenizer=tok, image_processor=tiny_image_processor())
    assert processor.max_length == 256 and isinstance(processor.max_length, int)
