"""Equal to Otter: a checkpoint saved by Otter's own model classes, converted, gives Otter's logits and tokens.

Otter is installed with `pip install --no-deps otter-ai==0.0.0a8` and imported, never copied. Its classes build the
reference on tiny random configs (a 1024-wide CLIP tower: Otter fixes its resampler's width), save it with
`save_pretrained`, and `from_otter` reads that directory as it reads a hub repository.
"""

import contextlib
import copy
import io
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

pytestmark = pytest.mark.peer
pytest.importorskip("einops", reason="Otter's model needs einops")
otter_modeling = pytest.importorskip("otter_ai.models.otter.modeling_otter", reason="otter-ai is not installed")
flamingo_modeling = pytest.importorskip("otter_ai.models.flamingo.modeling_flamingo")
from otter_ai.models.flamingo.configuration_flamingo import FlamingoConfig as OtterFlamingoConfig  # noqa: E402
from otter_ai.models.otter.configuration_otter import OtterConfig  # noqa: E402

from flamingo.build import load_pretrained  # noqa: E402
from flamingo.cli import main  # noqa: E402
from flamingo.convert import from_otter  # noqa: E402
from flamingo.convert.otter import split_otter_state  # noqa: E402
from flamingo.tiny import random_image, tiny_lm, tiny_tokenizer, tiny_vision  # noqa: E402

from helpers import chat_run_config  # noqa: E402

PROMPTS = ["<image>User: what is it? GPT:<answer> a red square.<|endofchunk|><image>User: and this one? GPT:<answer>",
           "<image>User: describe the image GPT:<answer>"]
MPT_TEXT = dict(architectures=["MPTForCausalLM"], model_type="mpt", d_model=32, hidden_size=32, n_heads=4, n_layers=4,
                max_seq_len=512, vocab_size=320, expansion_ratio=4, no_bias=True, tie_word_embeddings=True,
                attn_config=dict(alibi=True, attn_impl="torch", attn_pdrop=0.0), init_device="cpu")


def _reference(tmp_path, monkeypatch, lm: str = "llama", every: int = 2, frames=None, kind: str = "otter",
               lora: bool = False):
    """(Otter's model, its save_pretrained directory, the base tokenizer's directory)."""
    tok_dir = tmp_path / "llama-tokenizer"  # Otter picks LLaMA's tokenizer by "llama" in the LM's _name_or_path
    tiny_tokenizer().save_pretrained(tok_dir)
    modeling = otter_modeling if kind == "otter" else flamingo_modeling
    # Otter's code names the MPT tokenizer by its hub name; offline, the same tiny one stands in for it
    monkeypatch.setattr(modeling, "AutoTokenizer", type("Tok", (), {
        "from_pretrained": staticmethod(lambda *a, **k: AutoTokenizer.from_pretrained(tok_dir))}))
    if lm == "llama":
        text = tiny_lm("llama", vocab_size=310).config.to_dict()
        text.update(_name_or_path=str(tok_dir), architectures=["LlamaForCausalLM"])
    else:
        text = dict(MPT_TEXT)
    vision = tiny_vision("clip", hidden_size=1024, num_layers=1).config.to_dict()
    extra = {} if frames is None else {"max_num_frames": frames}
    if lora:  # Otter's LoRA fine-tunes: its LM under PEFT (converting_otter_to_lora.py's settings)
        extra["lora_config"] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # Otter prints every trainable parameter
        if kind == "otter":
            model = otter_modeling.OtterForConditionalGeneration(OtterConfig(
                vision_config=vision, text_config=text, cross_attn_every_n_layers=every, **extra))
        else:
            model = flamingo_modeling.FlamingoForConditionalGeneration(OtterFlamingoConfig(
                vision_config=vision, text_config=text, cross_attn_every_n_layers=every,
                use_media_placement_augmentation=False))
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero gates, a fine-tuned table (Otter trains it all) and, for video, frame embeddings
        for name, p in model.named_parameters():
            if name.endswith("attn_gate"):
                p.uniform_(0.3, 1.0)
            elif name.endswith("ff_gate"):
                p.uniform_(-1.0, -0.3)
        table = model.lang_encoder.get_input_embeddings().weight
        table.add_(0.01 * torch.randn_like(table))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # trained adapters
                p.normal_(0.0, 0.05)
    model.eval().save_pretrained(tmp_path / "otter")
    return model, tmp_path / "otter", tok_dir


def _reference_logits(model, batch):
    with torch.no_grad():
        return model(vision_x=batch["images"].clone(), lang_x=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("lm,every", [("llama", 2), ("mpt", 1)])
def test_logits_equal_otter(tmp_path, monkeypatch, lm, every):
    reference, directory, tok_dir = _reference(tmp_path, monkeypatch, lm, every)
    ours, processor = from_otter(directory, tokenizer=tok_dir)
    assert ours.xattn_layer_indices == [i for i in range(4) if (i + 1) % every == 0]
    assert processor.template == "otter"
    for token in ("<|endofchunk|>", "<image>", "<answer>"):  # Otter's ids, and our trained rows
        assert processor.tokenizer.convert_tokens_to_ids(token) == reference.text_tokenizer.convert_tokens_to_ids(token)
    assert ours.config.num_new_tokens == 4 and ours.new_token_embeddings.requires_grad
    batch = processor(PROMPTS, images=[[random_image(0), random_image(1)], [random_image(2)]], padding_side="right")
    assert batch["input_ids"][0].tolist() == reference.text_tokenizer(PROMPTS[0])["input_ids"]
    expected = _reference_logits(reference, batch)
    with torch.no_grad():
        got = ours(**batch).logits
    real = batch["attention_mask"].bool()
    assert got.shape == expected.shape
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    bare = ours.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (bare[real] - expected[real]).abs().max() > 1e-2  # the images and blocks count


def test_a_repository_shipping_its_own_tokenizer_converts(tmp_path, monkeypatch):
    """An Otter repository with its own tokenizer (holding <|endofchunk|>, <image>, <answer> in the LM's trained
    table): the converter reads it (the repository's tokenizer first), the tokens keep Otter's ids and rows, and the
    logits are Otter's. It was refused as a tokenizer already holding <image>."""
    reference, directory, _ = _reference(tmp_path, monkeypatch, "llama", 2)
    reference.text_tokenizer.save_pretrained(directory)
    ours, processor = from_otter(directory)
    assert ours.config.num_new_tokens == 0
    assert ours.config.media_token_id == reference.text_tokenizer.convert_tokens_to_ids("<image>")
    batch = processor(PROMPTS[:1], images=[[random_image(0), random_image(1)]], padding_side="right")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, _reference_logits(reference, batch), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lm", ["llama", "mpt"])
def test_a_conversion_names_no_base_model(tmp_path, monkeypatch, lm):
    """Otter's configs name the base models it started from (`_name_or_path` of text_config, vision_config: a
    LLaMA or MPT, CLIP). The converted backbones are the checkpoint's own, trained, so the model names neither: a
    trained-only save, which would reload those base models' weights, is refused, and training saves it whole."""
    from flamingo.train.trainer import final_save_trained_only

    _, directory, tok_dir = _reference(tmp_path, monkeypatch, lm, 2)
    config = json.loads((directory / "config.json").read_text())
    for part, base in (("text_config", "base-lm"), ("vision_config", "clip")):
        (tmp_path / base).mkdir()  # they resolve here, as Hub names would
        config[part]["_name_or_path"] = str(tmp_path / base)
    (directory / "config.json").write_text(json.dumps(config))
    ours, processor = from_otter(directory, tokenizer=tok_dir)
    assert ours.config.lm_name_or_path is None and ours.config.vision_name_or_path is None
    with pytest.raises(ValueError, match="trained-only checkpoint needs the backbones"):
        ours.save_pretrained(str(tmp_path / "small"), trained_only=True, processor=processor)
    assert not final_save_trained_only(ours, None)


def test_video_equal_otter(tmp_path, monkeypatch):
    """Otter-Video: frames of one medium, a learned embedding per frame (its `frame_embs`, our time embeddings)."""
    reference, directory, tok_dir = _reference(tmp_path, monkeypatch, "llama", 2, frames=4)
    ours, processor = from_otter(directory, tokenizer=tok_dir)
    assert ours.config.max_frames == 4
    torch.testing.assert_close(ours.resampler.time_embeddings.reshape(4, -1), reference.perceiver.frame_embs)
    video = [random_image(k) for k in range(3)]
    batch = processor([PROMPTS[1]], images=[[video]])
    assert batch["images"].shape[:3] == (1, 1, 3)
    torch.testing.assert_close(ours(**batch).logits.detach(), _reference_logits(reference, batch),
                               atol=1e-4, rtol=1e-4)


def test_greedy_tokens_equal_otter_uncached(tmp_path, monkeypatch):
    """Otter's uncached generate attends every token to its image, as ours does (its cached steps see none: the
    module docstring); the same greedy tokens, stopping at `<|endofchunk|>` as Otter's generate does."""
    reference, directory, tok_dir = _reference(tmp_path, monkeypatch, "llama", 2)
    ours, processor = from_otter(directory, tokenizer=tok_dir)
    batch = processor([PROMPTS[0]], images=[[random_image(0), random_image(1)]])
    with torch.no_grad():
        expected = reference.generate(vision_x=batch["images"].clone(), lang_x=batch["input_ids"],
                                      attention_mask=batch["attention_mask"], max_new_tokens=8, do_sample=False,
                                      use_cache=False)
        got = ours.generate(**batch, max_new_tokens=8, do_sample=False)
    assert got.tolist() == expected.tolist()


def test_openflamingo_hf_format_equal(tmp_path, monkeypatch):
    """The Otter project's HF-format OpenFlamingo (`model_type: flamingo`): no `<answer>`, Flamingo's template."""
    reference, directory, tok_dir = _reference(tmp_path, monkeypatch, "llama", 2, kind="flamingo")
    ours, processor = from_otter(directory, tokenizer=tok_dir)
    assert processor.template == "flamingo" and "<answer>" not in processor.tokenizer.get_vocab()
    prompt = "<image>Output: a red square.<|endofchunk|><image>Output:"
    batch = processor([prompt], images=[[random_image(0), random_image(1)]])
    torch.testing.assert_close(ours(**batch).logits.detach(), _reference_logits(reference, batch),
                               atol=1e-4, rtol=1e-4)


def test_a_bf16_conversion_keeps_the_lms_rotary_frequencies_float32(tmp_path, monkeypatch):
    """As transformers' `from_pretrained(dtype=bf16)` leaves a LLaMA: its rotary `inv_freq` float32, not rounded."""
    _, directory, tok_dir = _reference(tmp_path, monkeypatch, "llama", 2)
    full, _ = from_otter(directory, tokenizer=tok_dir)
    half, _ = from_otter(directory, tokenizer=tok_dir, torch_dtype=torch.bfloat16)
    assert half.lm.get_input_embeddings().weight.dtype == torch.bfloat16
    for name in ("inv_freq", "original_inv_freq"):
        b = getattr(half.lm.model.rotary_emb, name)
        assert b.dtype == torch.float32 and torch.equal(b, getattr(full.lm.model.rotary_emb, name))


def test_cli_convert_then_load(tmp_path, monkeypatch, capsys):
    """`flamingo convert otter` writes a directory `load_pretrained` reads back: same logits, Otter's template; with
    --backbones a trained-only checkpoint refers to backbones written once."""
    reference, directory, tok_dir = _reference(tmp_path, monkeypatch, "mpt", 2)
    assert main(["convert", "otter", "--model", str(directory), "--tokenizer", str(tok_dir),
                 "--out", str(tmp_path / "whole")]) == 0
    assert main(["convert", "otter", "--model", str(directory), "--tokenizer", str(tok_dir),
                 "--out", str(tmp_path / "small"), "--backbones", str(tmp_path / "backbones"), "--trained-only"]) == 0
    assert "blocks before layers [1, 3]" in capsys.readouterr().out
    assert json.loads((tmp_path / "whole" / "flamingo_processor.json").read_text())["template"] == "otter"
    batch = None
    for out in ("whole", "small"):
        model, processor = load_pretrained(str(tmp_path / out))
        batch = batch or processor([PROMPTS[0]], images=[[random_image(0), random_image(1)]])
        torch.testing.assert_close(model(**batch).logits.detach(), _reference_logits(reference, batch),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lm", ["llama", "mpt"])
def test_an_otter_with_lora_adapters_converts_them_merged(tmp_path, monkeypatch, lm):
    """Otter saved with `lora_config` (its LM under PEFT's LoRA: q/v projections, MPT's Wqkv): converted with the
    adapters merged into the LM, the logits are Otter's."""
    peft = pytest.importorskip("peft")
    # Otter's code calls a printing method its training scripts add to PEFT's model
    monkeypatch.setattr(peft.PeftModel, "master_print_trainable_parameters", lambda self: None, raising=False)
    reference, directory, tok_dir = _reference(tmp_path, monkeypatch, lm, 2 if lm == "llama" else 1, lora=True)
    names = list(__import__("safetensors").safe_open(str(next(directory.glob("*.safetensors"))), "pt").keys())
    assert any(".lora_B" in n for n in names)
    ours, processor = from_otter(directory, tokenizer=tok_dir)
    batch = processor(PROMPTS, images=[[random_image(0), random_image(1)], [random_image(2)]], padding_side="right")
    expected = _reference_logits(reference, batch)
    with torch.no_grad():
        got = ours(**batch).logits
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
        without = copy.deepcopy(reference)  # not vacuous: the adapters change Otter's logits
        for name, p in without.named_parameters():
            if "lora_B" in name:
                p.zero_()
        assert (_reference_logits(without, batch)[real] - expected[real]).abs().max() > 1e-3


def test_bad_checkpoints_are_refused(tmp_path, monkeypatch):
    _, directory, tok_dir = _reference(tmp_path, monkeypatch, "llama", 2)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "idefics"}))
    with pytest.raises(ValueError, match="not Otter's"):
        from_otter(directory, tokenizer=tok_dir)
    (directory / "config.json").write_text(json.dumps({**config, "cross_attn_every_n_layers": 4}))
    with pytest.raises(ValueError, match="every 2 layers, its config says 4"):
        from_otter(directory, tokenizer=tok_dir)
    (directory / "config.json").write_text(json.dumps(config))
    whole = load_file(directory / "model.safetensors")
    for key in ("lang_encoder.model.layers.3.gated_cross_attn_layer.attn_gate", "perceiver.latents",
                "lang_encoder.model.layers.1.gated_cross_attn_layer.feed_forward.1.weight",
                "perceiver.layers.0.feed_forward.0.weight", "perceiver.layers.0.to_kv.weight"):
        save_file({k: v for k, v in whole.items() if k != key}, directory / "model.safetensors",
                  metadata={"format": "pt"})  # a damaged file: its missing tensor named as the file names it
        with pytest.raises(ValueError, match=f"^the Otter checkpoint lacks '{re.escape(key)}'$"):
            from_otter(directory, tokenizer=tok_dir)
    with pytest.raises(ValueError, match="LoRA"):
        split_otter_state({"lang_encoder.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                           torch.zeros(1)})
    with pytest.raises(ValueError, match="outside Otter's"):
        split_otter_state({"perceiver.latents": torch.zeros(1), "text_projection.weight": torch.zeros(1)})


def test_a_converted_otter_tunes_on_conversations_in_its_own_format(tmp_path, monkeypatch):
    """Convert, then `flamingo train` from it (`model.init_from`) on LLaVA-style conversations: the samples are
    written in Otter's format and labelled on the answers, the blocks and Otter's token rows train, the LM stays."""

    from flamingo.train.config import load_config
    from flamingo.train.trainer import Trainer

    _, directory, tok_dir = _reference(tmp_path, monkeypatch, "llama", 2)
    ours, processor = from_otter(directory, tokenizer=tok_dir)
    ours.save_pretrained(str(tmp_path / "converted"), processor=processor)
    path = chat_run_config(tmp_path, str(tmp_path / "converted"), steps=3)
    trainer = Trainer(load_config(str(path)))
    batch = next(iter(trainer.sources["chat"]))
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<image>User: What colour is it? GPT:<answer> Colour 0.<|endofchunk|>")
    answers = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert answers.strip() == "Colour 0.<|endofchunk|>"
    lm_before = {n: p.detach().clone() for n, p in trainer.model.lm.named_parameters()}
    rows_before = trainer.model.new_token_embeddings.detach().clone()
    out = trainer.run()
    assert all(torch.equal(p, lm_before[n]) for n, p in trainer.model.lm.named_parameters())
    assert not torch.equal(trainer.model.new_token_embeddings, rows_before)  # <|endofchunk|> is an answer token
    tuned, tuned_processor = load_pretrained(out)
    assert tuned_processor.template == "otter" and tuned.config.num_new_tokens == 4
