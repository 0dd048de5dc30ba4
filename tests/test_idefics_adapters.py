"""IDEFICS fine-tunes as PEFT LoRA adapters (what Hugging Face's IDEFICS fine-tuning notebooks save): converted with
the adapter merged, the model computes what PEFT's model computes (transformers' IDEFICS with the adapter), from an
adapter directory naming its base, from an explicit base + adapter, and through `flamingo convert idefics`."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft", reason="IDEFICS adapters need peft")
from test_idefics_equal import _inputs, _max_diff, _peer  # noqa: E402

from flamingo.convert import from_idefics  # noqa: E402
from flamingo.convert.adapters import read_lora_adapter  # noqa: E402


def _adapted(tmp_path, **lora):
    """(the base IDEFICS saved in tmp_path/base, its PEFT model with random adapters saved in tmp_path/adapter,
    the tokenizer)."""
    peer, tok = _peer("vector", True)
    peer.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    # the notebooks' choice: q, k and v projections everywhere they exist (LM, blocks, resampler, vision tower)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"],
                                "lora_dropout": 0.05, "bias": "none", **lora})
    model = peft.get_peft_model(copy.deepcopy(peer), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
            elif "modules_to_save" in name:  # a module it trained whole
                p.add_(0.3 * torch.randn_like(p))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    return peer, model.eval(), tok


def test_an_adapter_directory_converts_to_the_fine_tuned_model(tmp_path):
    peer, tuned, tok = _adapted(tmp_path)
    ours, processor = from_idefics(str(tmp_path / "adapter"))  # its config names the base directory
    batch = _inputs(processor)
    assert _max_diff(ours, tuned, batch, tok) <= 1e-5
    assert _max_diff(ours, peer, batch, tok) > 1e-3  # not vacuous: the adapter changes the model
    adapted = {n.split(".lora_")[0] for n, _ in tuned.named_parameters() if ".lora_A" in n}
    assert any(".vision_model." in n for n in adapted) and any("perceiver" in n for n in adapted)
    assert any("gated_cross_attn" in n for n in adapted) and any(".layers." in n and "vision" not in n
                                                                  for n in adapted)

    explicit, _ = from_idefics(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
    assert _max_diff(explicit, tuned, batch, tok) <= 1e-5


def test_a_training_checkpoint_directory_with_a_bin_adapter(tmp_path):
    """A trainer's `checkpoint-N/`: `adapter_model.bin` (PEFT's format before safetensors) beside pickled training
    arguments and optimizer state, which are never read."""
    import argparse

    _, tuned, tok = _adapted(tmp_path)
    ckpt = tmp_path / "checkpoint-500"
    tuned.save_pretrained(ckpt, safe_serialization=False)
    assert (ckpt / "adapter_model.bin").is_file() and not (ckpt / "adapter_model.safetensors").exists()
    torch.save(argparse.Namespace(lr=1e-4), ckpt / "training_args.bin")  # a pickled object: weights-only refuses it
    torch.save({"state": {}}, ckpt / "optimizer.pt")
    ours, processor = from_idefics(str(ckpt))
    assert _max_diff(ours, tuned, _inputs(processor), tok) <= 1e-5


def test_patterns_rslora_and_modules_to_save_merge_as_peft_does(tmp_path):
    _, tuned, tok = _adapted(tmp_path, use_rslora=True, rank_pattern={"perceiver_resampler.blocks.0.0.q_proj": 2},
                             alpha_pattern={"cross_attn.q_proj": 3}, modules_to_save=["post_attention_layernorm"])
    adapter = read_lora_adapter(str(tmp_path / "adapter"))
    assert adapter.replaced  # the layer norms it trained whole
    ours, processor = from_idefics(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
    assert _max_diff(ours, tuned, _inputs(processor), tok) <= 1e-5


def test_adapters_that_would_not_merge_exactly_are_refused(tmp_path):
    _adapted(tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        from_idefics(str(tmp_path / "adapter"))
    other, _ = _peer("vector", True)  # an adapter of a model with more layers than the base
    other_dir = tmp_path / "other"
    config = peft.LoraConfig(r=2, target_modules=["q_proj"])
    deeper = copy.deepcopy(other)
    deeper.model.layers.append(copy.deepcopy(deeper.model.layers[0]))
    peft.get_peft_model(deeper, config).save_pretrained(other_dir)
    with pytest.raises(ValueError, match="never read"):
        from_idefics(str(tmp_path / "base"), adapter=str(other_dir))


def test_convert_command_takes_an_adapter(tmp_path):
    from flamingo import load_pretrained
    from flamingo.cli import main

    _, tuned, tok = _adapted(tmp_path)
    assert main(["convert", "idefics", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "out")]) == 0
    model, processor = load_pretrained(str(tmp_path / "out"))
    assert _max_diff(model, tuned, _inputs(processor), tok) <= 1e-5


def test_a_saved_module_with_two_adapters_is_refused():
    """A PEFT-wrapped module saved whole with two adapter names: which was active is not in the file, so nothing is
    merged by guess."""
    from flamingo.convert.adapters import merge_saved_peft
    from flamingo.convert.checkpoints import CheckpointTensors

    lm = "lang_encoder.base_model.model.model.layers.0.self_attn.q_proj"
    state = {f"{lm}.base_layer.weight": torch.zeros(4, 4)}
    for name in ("default", "other"):
        state[f"{lm}.lora_A.{name}.weight"] = torch.zeros(2, 4)
        state[f"{lm}.lora_B.{name}.weight"] = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="several LoRA adapters"):
        merge_saved_peft(CheckpointTensors.of_dict(state, copy=False), alpha=2.0)
    del state[f"{lm}.lora_A.other.weight"], state[f"{lm}.lora_B.other.weight"]
    merged = merge_saved_peft(CheckpointTensors.of_dict(state, copy=False), alpha=2.0)
    assert list(merged) == ["lang_encoder.model.layers.0.self_attn.q_proj.weight"]
