"""Our model -> transformers' IDEFICS (flamingo/convert/to_idefics.py): `IdeficsForVisionText2Text.from_pretrained`
on the export gives our logits and greedy tokens, `IdeficsProcessor.from_pretrained` our inputs; converting the
export back gives our model again; what IDEFICS cannot compute is refused with the reasons.

The models are tiny IDEFICS built as tests/test_idefics_equal.py builds them, converted, then changed as
fine-tuning here would change them (blocks, resampler, added rows, gates and the first time embedding), so that an
export that wrote the original IDEFICS tensors, or dropped any trained part, fails.
"""

import copy

import pytest
import torch
from test_idefics_equal import _inputs, _max_diff, _peer, _peer_inputs
from transformers import IdeficsForVisionText2Text

from flamingo.cli import main
from flamingo.convert import from_idefics
from flamingo.convert.to_idefics import _idefics_model, idefics_config, idefics_state, incompatibilities, save_idefics
from flamingo.runtime.compat import TRANSFORMERS
from flamingo.tiny import random_image, tiny_flamingo


def _fine_tuned(alpha_type: str, qk_norms: bool):
    """(IDEFICS, its tokenizer, our conversion of it trained a little, its processor)."""
    peer, tok = _peer(alpha_type, qk_norms)
    ours, processor = from_idefics(copy.deepcopy(peer), copy.deepcopy(tok))
    torch.manual_seed(5)
    with torch.no_grad():
        for block in ours.xattn:
            block.attn_gate.uniform_(0.2, 1.0)
            block.ffw_gate.uniform_(-1.0, -0.2)
            for w in (block.attn.to_q.weight, block.attn.to_kv.weight, block.ffw.down_proj.weight):
                w.add_(0.1 * torch.randn_like(w))
        ours.resampler.latents.add_(0.1 * torch.randn_like(ours.resampler.latents))
        for layer in ours.resampler.layers:
            layer["attn"].to_kv.weight.add_(0.1 * torch.randn_like(layer["attn"].to_kv.weight))
        ours.resampler.time_embeddings.normal_(0, 0.5)  # trained from from_idefics's zeros
        ours.new_token_embeddings.normal_(0, 0.5)
        ours.new_lm_head.normal_(0, 0.5)
    return peer, tok, ours, processor


def _load(directory) -> IdeficsForVisionText2Text:
    model, info = IdeficsForVisionText2Text.from_pretrained(str(directory), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


@pytest.mark.parametrize("alpha_type,qk_norms", [("float", False), ("vector", True)])
def test_idefics_loads_the_export_and_computes_our_logits(alpha_type, qk_norms, tmp_path):
    peer, tok, ours, processor = _fine_tuned(alpha_type, qk_norms)
    config = save_idefics(ours, processor, str(tmp_path / "idefics"))
    assert (config.alpha_type, config.cross_layer_interval, config.qk_layer_norms) == (alpha_type, 2, qk_norms)
    assert (config.vocab_size, config.additional_vocab_size) == (peer.config.vocab_size, 2)
    theirs = _load(tmp_path / "idefics")
    batch = _inputs(processor)
    assert _max_diff(ours, theirs, batch, tok) <= 1e-5
    assert _max_diff(ours, peer, batch, tok) > 1e-3  # not vacuous: training moved us off the IDEFICS we came from

    # greedy tokens, with the export's generation config only (it never emits <image>, as our generate)
    mine = ours.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    with torch.no_grad():
        generated = theirs.generate(**_peer_inputs(batch, tok), max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(mine, generated)

    back, back_processor = from_idefics(str(tmp_path / "idefics"))
    again = _inputs(back_processor)
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(again["images"], batch["images"])
    with torch.no_grad():
        diff = (back(**again).logits - ours(**batch).logits)[batch["attention_mask"].bool()].abs().max()
    assert diff <= 1e-5


@pytest.mark.skipif(TRANSFORMERS < (5, 0), reason="transformers 4's IdeficsProcessor takes only a "
                    "LlamaTokenizerFast, and the tiny tokenizer is a PreTrainedTokenizerFast")
def test_idefics_processor_and_model_from_the_export_compute_what_we_do(tmp_path):
    from transformers import IdeficsProcessor

    _, _, ours, processor = _fine_tuned("vector", True)
    save_idefics(ours, processor, str(tmp_path / "idefics"))
    their_processor = IdeficsProcessor.from_pretrained(str(tmp_path / "idefics"))
    images = [random_image(1, size=48), random_image(2, size=40)]
    theirs = their_processor(text=[["User:", images[0], images[1], "Describe these.\nAssistant:"]],
                             return_tensors="pt")
    mine = processor("User:<image><image>Describe these.\nAssistant:", images=images)
    assert mine["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert torch.allclose(mine["images"][:, :, 0], theirs["pixel_values"], atol=1e-6)
    with torch.no_grad():
        diff = (ours(**mine).logits - _load(tmp_path / "idefics")(**theirs).logits).abs().max()
    assert diff <= 1e-5


def test_an_lm_shipping_a_sampling_filter_exports(tmp_path):
    """An LM whose generation config ships sampling with min_p: Flamingo's greedy config keeps a neutral min_p 0,
    which transformers' strict save refused ("min_p is set ... do_sample is not set"). The export is greedy, no
    filter, and loads."""
    _, _, ours, processor = _fine_tuned("float", False)
    ours.lm.generation_config.update(do_sample=True, min_p=0.05)
    save_idefics(ours, processor, str(tmp_path / "idefics"))
    config = _load(tmp_path / "idefics").generation_config
    assert not config.do_sample and config.min_p is None


def test_every_idefics_tensor_gets_a_value():
    _, _, ours, processor = _fine_tuned("float", False)
    config, state = idefics_config(ours, processor), idefics_state(ours)
    _idefics_model(config, state)
    for broken in ({k: v for k, v in state.items() if k != "lm_head.additional_fc.weight"},
                   {**state, "model.extra.weight": torch.zeros(1)},
                   {**state, "model.perceiver_resampler.latents": torch.zeros(3, 32)}):
        with pytest.raises(ValueError, match="does not fit IdeficsForVisionText2Text"):
            _idefics_model(config, broken)


def test_what_idefics_cannot_compute_is_refused(tmp_path, capsys):
    import importlib.util

    lora = importlib.util.find_spec("peft") is not None  # (the oldest supported pair runs without it)
    model, processor = tiny_flamingo("llama", only_attend_last_image=False, num_image_references=2,
                                     **({"lm_lora": {"r": 2}} if lora else {}))
    reasons = incompatibilities(model, processor)
    for words in ("'flamingo' cross-attention blocks", "every earlier image", "image reference", "perceiver",
                  "video (max_frames=4", "CLS token included", *(("LoRA adapters",) if lora else ()),
                  "'flamingo' prompt template", "image preprocessing other than IDEFICS's"):
        assert any(words in r for r in reasons), (words, reasons)
    with pytest.raises(ValueError, match="IDEFICS cannot represent this model"):
        save_idefics(model, processor, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    assert main(["export", "idefics", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 2
    assert "IDEFICS cannot represent this model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    other, other_processor = tiny_flamingo("gpt2", "siglip", block="idefics", xattn_ffw_dim=64)
    reasons = incompatibilities(other, other_processor)
    for words in ("GPT2LMHeadModel LM", "SiglipVisionModel vision tower"):
        assert any(words in r for r in reasons), (words, reasons)
    other, other_processor = tiny_flamingo("llama", block="idefics", xattn_ffw_dim=7, xattn_heads=2)
    reasons = incompatibilities(other, other_processor)
    for words in ("block attention of 2 heads", "a block MLP of 7"):
        assert any(words in r for r in reasons), (words, reasons)

    _, _, ours, processor = _fine_tuned("float", False)
    assert incompatibilities(ours, processor) == []
    ungated = copy.deepcopy(ours)  # rules IDEFICS computes otherwise, set on an otherwise exportable model
    ungated.config.gated = False
    ungated.config.attend_next_image = True
    ungated.config.imageless_rows_skip_blocks = True
    ungated.config.xattn_norm_eps = 1e-5
    ungated.xattn_layer_indices = [1, 3]
    reasons = incompatibilities(ungated)
    for words in ("ungated blocks", "OpenFlamingo v1's rule", "imageless_rows_skip_blocks",
                  "blocks before layers [1, 3]", "block norm epsilon"):
        assert any(words in r for r in reasons), (words, reasons)


def test_a_quantized_model_is_refused():
    pytest.importorskip("torchao")
    from flamingo.model.quantize import quantize_frozen

    _, _, ours, _ = _fine_tuned("float", False)
    quantize_frozen(ours, "int8")
    assert any("quantized backbones (int8)" in r for r in incompatibilities(ours))


def test_export_idefics_command_round_trip(tmp_path):
    peer, tok, ours, processor = _fine_tuned("vector", True)
    ours.save_pretrained(str(tmp_path / "ours"), processor=processor)
    assert main(["export", "idefics", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "idefics")]) == 0
    assert _max_diff(ours, _load(tmp_path / "idefics"), _inputs(processor), tok) <= 1e-5


def test_export_command_writes_float_weights_of_quantized_and_lora_models(tmp_path):
    """A model saved with `quantize_frozen` (loaded quantized by default) exports its float weights; one with LoRA
    adapters on its LM exports them merged (IDEFICS's LM is written whole)."""
    import importlib.util

    from flamingo.model.lora import apply_lora

    _, tok, ours, processor = _fine_tuned("vector", True)
    if importlib.util.find_spec("torchao") is not None:
        saved = copy.deepcopy(ours)
        saved.config.quantize_frozen = "int8"  # what a run with quantize_frozen: int8 saves
        saved.save_pretrained(str(tmp_path / "int8"), processor=processor)
        assert main(["export", "idefics", "--model", str(tmp_path / "int8"), "--out", str(tmp_path / "a")]) == 0
        assert _max_diff(ours, _load(tmp_path / "a"), _inputs(processor), tok) <= 1e-5
    if importlib.util.find_spec("peft") is not None:
        adapted = copy.deepcopy(ours)
        adapted.config.lm_lora = {"r": 2, "alpha": 2, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}
        apply_lora(adapted.lm, adapted.config.lm_lora)
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if ".lora_B" in name:
                    p.normal_(0.0, 0.1)
        adapted.save_pretrained(str(tmp_path / "lora"), processor=processor)
        assert main(["export", "idefics", "--model", str(tmp_path / "lora"), "--out", str(tmp_path / "b")]) == 0
        assert _max_diff(adapted, _load(tmp_path / "b"), _inputs(processor), tok) <= 1e-5
        assert _max_diff(ours, _load(tmp_path / "b"), _inputs(processor), tok) > 1e-3


def test_export_replaces_only_an_earlier_idefics_export(tmp_path, capsys):
    """Every transformers directory holds a config.json: `--out` over one that is not IDEFICS's (another model, the
    source model's own LM) is refused before the model loads, its files kept; an earlier export is replaced."""
    import os
    import shutil

    from flamingo.build import load_pretrained

    _, tok, ours, processor = _fine_tuned("float", False)
    ours.save_pretrained(str(tmp_path / "ours"), processor=processor)
    other = tmp_path / "llama"  # an unrelated model directory, with the user's notes
    shutil.copytree(tmp_path / "ours" / "lm", other)
    (other / "notes.txt").write_text("keep me")
    before = sorted(os.listdir(other))
    command = ["export", "idefics", "--model", str(tmp_path / "ours"), "--out"]
    assert main([*command, str(other)]) == 2
    assert "is not an earlier IDEFICS export of flamingo" in capsys.readouterr().err
    assert sorted(os.listdir(other)) == before
    assert main([*command, str(tmp_path / "ours" / "lm")]) == 2  # the source's own LM
    assert main([*command, str(tmp_path / "ours" / "idefics")]) == 2  # inside the source
    assert "which it is made from" in capsys.readouterr().err
    load_pretrained(str(tmp_path / "ours"))  # the source is intact

    for _ in range(2):  # new, then over the earlier export
        assert main([*command, str(tmp_path / "idefics")]) == 0
    assert _max_diff(ours, _load(tmp_path / "idefics"), _inputs(processor), tok) <= 1e-5
