"""Quantized frozen backbones (flamingo/model/quantize.py): at gate 0 the model is its quantized LM, quantized
logits stay close to fp32, only the backbones' frozen linear weights are touched, save -> load re-quantizes to the
same logits, gradients reach the trained blocks through a quantized LM, and unavailable modes fail clearly."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from flamingo import FlamingoConfig, from_backbones, load_pretrained  # noqa: E402
from flamingo.cli import main  # noqa: E402
from flamingo.model.quantize import (  # noqa: E402
    QuantizationUnavailable,
    QuantizedLinear,
    check_available,
    is_quantized,
    module_bytes,
    quantize_frozen,
    quantized_mode,
)
from flamingo.tiny import random_image, set_gates, tiny_flamingo, tiny_flamingo_config  # noqa: E402
from flamingo.train.config import load_config  # noqa: E402
from flamingo.train.trainer import Trainer  # noqa: E402

from helpers import interrupted_at  # noqa: E402
from train_fixtures import save_backbones, train_config, write_datasets  # noqa: E402

CPU_MODES = ["int8", "nf4"]  # int4 packs for CUDA's kernel only: bench/memory.py runs it on a GPU
PROMPT = "<image>Question: what? Short answer: red.<|endofchunk|><image>Question: and this? Short answer:"
# Mean |logit - fp32 logit| / std(fp32 logits) on the tiny Llama (hidden 32) with gates 0.5, as measured: int8 0.11%,
# nf4 2.3%. The bounds leave 2-3x.
RELATIVE_ERROR = {"int8": 0.003, "nf4": 0.05}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _batch(processor):
    return processor(PROMPT, images=[random_image(0), random_image(1)])


@pytest.mark.parametrize("mode", CPU_MODES)
def test_gate_zero_is_the_quantized_bare_lm(make_model, mode):
    model, processor = make_model(gates=0.0)
    quantize_frozen(model, mode)
    batch = _batch(processor)
    first_new = model.config.first_new_token_id
    with torch.no_grad():
        ours = model(**batch).logits
        bare = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # no hooks act
    assert quantized_mode(model) == mode
    assert torch.equal(ours[..., :first_new], bare[..., :first_new])


@pytest.mark.parametrize("mode", CPU_MODES)
def test_quantized_logits_close_to_fp32(make_model, mode):
    model, processor = make_model(gates=0.5)
    batch = _batch(processor)
    with torch.no_grad():
        ref = model(**batch).logits
        quantize_frozen(model, mode)
        out = model(**batch).logits
    relative = float((out - ref).abs().mean() / ref.std())
    assert 0 < relative < RELATIVE_ERROR[mode], relative


def test_a_quantization_interrupted_then_run_again_quantizes_the_rest(make_model, monkeypatch):
    """A Ctrl-C during a long quantization, then quantize_frozen again: the retry saw the first quantized layer,
    took the whole model for quantized and did nothing (4 of 40 layers, the config still 'none'). It now quantizes
    the rest and records the mode: the model of a quantization that was never interrupted."""
    import flamingo.model.quantize as quantize

    model, processor = make_model(gates=0.5)
    fresh = copy.deepcopy(model)
    batch = _batch(processor)
    whole = quantize_frozen(fresh, "int8")
    monkeypatch.setattr(quantize, "_quantize_weight", interrupted_at(quantize._quantize_weight, 5))
    with pytest.raises(KeyboardInterrupt):
        quantize_frozen(model, "int8")
    monkeypatch.undo()
    assert model.config.quantize_frozen == "none" and quantized_mode(model) == "int8"
    assert quantize_frozen(model, "int8")["quantized"] == whole["quantized"] - 4
    assert model.config.quantize_frozen == "int8"
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == whole["quantized"]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)
    assert quantize_frozen(model, "int8")["quantized"] == 0  # recorded: nothing more to do


@pytest.mark.parametrize("mode", CPU_MODES)
def test_only_frozen_backbone_linears_are_quantized(make_model, mode):
    model, _ = make_model()
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = module_bytes(model, trained=False)
    report = quantize_frozen(model, mode)
    assert report["quantized"] > 0 and module_bytes(model, trained=False) < frozen_before
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            in_backbone = full.startswith(("vision.", "lm."))
            if is_quantized(p):
                assert in_backbone and type(module) is QuantizedLinear and not p.requires_grad, full
            else:
                assert type(p) is nn.Parameter and type(p.data) is torch.Tensor, full
    for part in (model.xattn, model.resampler):  # the trained modules: plain tensors, unchanged values
        assert not any(is_quantized(t) for t in [*part.parameters(), *part.buffers()])
    for name, p in model.named_parameters():
        if name in trained_before:
            assert torch.equal(p.detach(), trained_before[name]), name
    assert set(trained_before) == set(model.trainable_parameters())
    assert not is_quantized(model.lm.get_input_embeddings().weight)  # embeddings stay in their dtype
    assert not is_quantized(model.new_token_embeddings)
    head = model.lm.get_output_embeddings()
    assert type(head) is nn.Linear and not is_quantized(head.weight)  # Flamingo's hook fills the added rows' logits
    linears = [m for m in [*model.vision.modules(), *model.lm.modules()]
               if type(m) in (nn.Linear, QuantizedLinear) and m is not head]
    assert sum(is_quantized(m.weight) for m in linears) == report["quantized"]
    assert report["quantized"] + report["kept"] == len(linears)


@pytest.fixture
def backbone_dirs(tmp_path):
    return save_backbones(str(tmp_path))


@pytest.mark.parametrize("mode", CPU_MODES)
def test_trained_only_save_load_requantizes_to_the_same_logits(backbone_dirs, tmp_path, mode):
    with pytest.warns(UserWarning, match=rf"quantize_frozen='{mode}' is applied when a model loads .* not by "
                      r"from_backbones: these backbones are in float"):  # the model below ran in float, silently
        model, processor = from_backbones(*backbone_dirs, config=tiny_flamingo_config(quantize_frozen=mode))
    set_gates(model, 0.7)
    assert quantized_mode(model) == "none"  # the config asks; quantize_frozen applies it once on the device
    quantize_frozen(model)
    batch = _batch(processor)
    with torch.no_grad():
        before = model.eval()(**batch).logits
    with pytest.raises(ValueError, match="trained-only"):  # lossy: a full save would not hold the original weights
        model.save_pretrained(str(tmp_path / "full"))
    out = str(tmp_path / "ckpt")
    model.save_pretrained(out, trained_only=True, processor=processor)
    assert not os.path.isdir(os.path.join(out, "lm"))
    loaded, loaded_processor = load_pretrained(out)
    assert quantized_mode(loaded) == mode and loaded.config.quantize_frozen == mode
    with torch.no_grad():
        assert torch.equal(loaded(**_batch(loaded_processor)).logits, before)
    plain, _ = load_pretrained(out, quantize_frozen="none")  # the same checkpoint, backbones as saved by HF
    assert quantized_mode(plain) == "none"


def test_full_checkpoint_loads_quantized_on_request(backbone_dirs, tmp_path):
    model, processor = from_backbones(*backbone_dirs, config=tiny_flamingo_config())
    set_gates(model, 0.7)
    out = str(tmp_path / "full")
    model.save_pretrained(out, processor=processor)  # unquantized: the backbones in their own dtype
    loaded, _ = load_pretrained(out, quantize_frozen="int8")
    reference = copy.deepcopy(model)
    quantize_frozen(reference, "int8")
    batch = _batch(processor)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, reference.eval()(**batch).logits)


@pytest.mark.parametrize("mode", CPU_MODES)
def test_gradients_reach_the_blocks_through_a_quantized_lm_and_loss_falls(make_model, mode):
    model, processor = make_model(gates=0.1)
    quantize_frozen(model, mode)
    batch = _batch(processor)
    model.train()
    trained = list(model.trainable_parameters().values())
    optimizer = torch.optim.AdamW(trained, lr=3e-3)
    losses = []
    for step in range(8):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        if step == 0:
            for name, p in model.xattn.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert all(p.grad is None for p in model.lm.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("mode", CPU_MODES)
def test_backward_keeps_no_dequantized_weights_and_gives_their_input_gradient(make_model, mode):
    """Autograd saves the same activations as with float weights (torchao's own linear would also keep a
    dequantized copy of each weight), and the input gradient is the one through the dequantized weight."""
    def saved_bytes(model, batch):
        params = {p.untyped_storage().data_ptr() for p in model.parameters() if not is_quantized(p)}
        saved = {}

        def pack(t):
            if not is_quantized(t) and t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch, labels=batch["input_ids"])
        return sum(saved.values())

    model, processor = make_model()
    batch = _batch(processor)
    plain = saved_bytes(model, batch)
    quantize_frozen(model, mode)
    assert saved_bytes(model, batch) == plain

    layer = model.lm.model.layers[0].mlp.down_proj
    assert type(layer) is QuantizedLinear
    x = torch.randn(3, layer.in_features, requires_grad=True)
    (layer(x) * torch.arange(layer.out_features)).sum().backward()
    dense = layer.weight.to(torch.float32) if mode == "nf4" else layer.weight.dequantize(torch.float32)
    x2 = x.detach().clone().requires_grad_()
    (torch.nn.functional.linear(x2, dense, layer.bias) * torch.arange(layer.out_features)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("mode", CPU_MODES)
def test_quantized_layer_gives_a_float_layers_dtype(make_model, mode):
    model, _ = make_model()
    quantize_frozen(model, mode)
    layer = model.lm.model.layers[0].mlp.up_proj
    x = torch.randn(2, layer.in_features)
    assert layer(x).dtype == torch.float32 and layer(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # int8's scales are fp32: no promotion to them
        assert layer(x).dtype == layer(x.requires_grad_()).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", CPU_MODES)
def test_deepcopy_of_a_quantized_model_is_bit_equal(make_model, mode):
    """The tiny LM's nf4 layers have fewer than 256 blocks, so they get a smaller scaler block; torchao's NF4 clone
    (what deepcopy called) quantized again with 256 and failed. The copy now holds the same stored tensors."""
    model, processor = make_model()
    quantize_frozen(model, mode)
    twin = copy.deepcopy(model)
    assert quantized_mode(twin) == mode
    weights = {n: p for n, p in model.named_parameters() if is_quantized(p)}
    copied = {n: p for n, p in twin.named_parameters() if is_quantized(p)}
    assert weights.keys() == copied.keys() and all(copied[n] is not p for n, p in weights.items())
    for name, weight in weights.items():  # the stored tensors (packed data, scales), not their dequantized values
        inner, _ = weight.__tensor_flatten__()
        assert all(torch.equal(getattr(copied[name], t), getattr(weight, t)) for t in inner)
    batch = _batch(processor)
    with torch.no_grad():
        assert torch.equal(twin(**batch).logits, model(**batch).logits)


def test_unavailable_modes_and_trained_backbones_fail_clearly(make_model):
    with pytest.raises(QuantizationUnavailable, match="nf4"):
        check_available("int4", "cpu")
    with pytest.raises(ValueError, match="quantize_frozen must be one of"):
        check_available("int3", "cpu")
    with pytest.raises(ValueError, match="freeze_lm"):
        FlamingoConfig(quantize_frozen="int8", freeze_lm=False)
    model, _ = make_model()
    with pytest.raises(QuantizationUnavailable, match="int4"):
        quantize_frozen(model, "int4")  # on the CPU
    assert quantized_mode(model) == "none"
    quantize_frozen(model, "int8")
    with pytest.raises(ValueError, match="one-way"):
        quantize_frozen(model, "nf4")
    trained_lm, _ = make_model(freeze_lm=False)
    with pytest.raises(ValueError, match="freeze_lm is false"):
        quantize_frozen(trained_lm, "int8")


def test_cli_generates_with_quantized_backbones_and_refuses_int4_on_the_cpu(tmp_path, capsys):
    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    random_image(0).save(tmp_path / "a.png")
    prompt = "<image>Question: what? Answer:"
    args = ["generate", "--model", str(tmp_path / "model"), "--prompt", prompt, "--image", str(tmp_path / "a.png"),
            "--max-new-tokens", "4", "--num-beams", "2"]
    assert main(args + ["--quantize-frozen", "nf4"]) == 0
    loaded, _ = load_pretrained(str(tmp_path / "model"), quantize_frozen="nf4")
    batch = processor(prompt, images=[str(tmp_path / "a.png")])
    out = loaded.generate(**batch, max_new_tokens=4, num_beams=2)
    assert capsys.readouterr().out == processor.decode(out[0, batch["input_ids"].shape[1]:]) + "\n"
    assert main(args + ["--quantize-frozen", "int4"]) == 2
    assert "nf4" in capsys.readouterr().err


def test_a_model_saved_as_int4_names_its_saved_mode_and_the_override_on_the_cpu(tmp_path, capsys):
    """A GPU run's int4 model loaded on the CPU: the error said "use nf4 or int8" to a user who passed no mode."""
    model, processor = tiny_flamingo()
    model.config.quantize_frozen = "int4"  # as a GPU run saves it
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    random_image(0).save(tmp_path / "a.png")
    args = ["generate", "--model", str(tmp_path / "model"), "--prompt", "<image>A", "--image",
            str(tmp_path / "a.png"), "--max-new-tokens", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "int4 is the model config's mode (a saved model's" in err and "--quantize-frozen nf4|int8|none" in err
    assert main(args + ["--quantize-frozen", "none"]) == 0
    with pytest.raises(QuantizationUnavailable) as given:  # a mode given here is not the config's
        quantize_frozen(model, "int4")
    assert "config's mode" not in str(given.value)


def test_trainer_quantizes_after_building_and_saves_trained_only(tmp_path):
    root = str(tmp_path)
    vision, lm = save_backbones(root)
    data = write_datasets(os.path.join(root, "data"), n_pairs=8, n_docs=4)
    path = train_config(root, vision, lm, data, steps=3, out=os.path.join(root, "run"), interleaved=False)
    config = load_config(path, ["model.flamingo.quantize_frozen=nf4"])
    with warnings.catch_warnings():  # from_backbones' "call quantize_frozen yourself" is not the trainer's: it does
        warnings.filterwarnings("error", message=".*is applied when a model loads")
        trainer = Trainer(config)
    assert quantized_mode(trainer.model) == "nf4" and trainer.model.config.quantize_frozen == "nf4"
    out = trainer.run()
    loaded, _ = load_pretrained(out)
    assert quantized_mode(loaded) == "nf4"


def test_frozen_adapters_and_gpt2_conv1d_layers(make_model):
    """LoRA adapters keep their dtype even when every parameter is frozen (an inference idiom); GPT-2's Conv1D
    projections are not packed, and a warning says so (they were skipped silently)."""
    from flamingo.model import lora

    model, _ = make_model(lm_lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    model.requires_grad_(False)
    quantize_frozen(model, "int8")
    adapters = [(n, p) for n, p in model.named_parameters() if lora.is_adapter_key(n)]
    assert adapters and not any(is_quantized(p) for _, p in adapters)
    gpt2, _ = make_model("gpt2")
    with pytest.warns(UserWarning, match="the LM's Conv1D layers are not quantized"):
        quantize_frozen(gpt2, "int8")


def test_frozen_linear_subclasses_are_counted_and_warned_about_not_quantized(make_model):
    """A frozen layer whose class subclasses nn.Linear (its forward may be more than F.linear) stays as it is, and
    the counts and a warning say how many (they were left out silently)."""

    class ScaledLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model, _ = make_model()
    linears = [(parent, name, m) for parent in model.lm.modules() for name, m in parent.named_children()
               if type(m) is nn.Linear and m is not model.lm.get_output_embeddings()]
    parent, name, old = linears[0]
    special = ScaledLinear(old.in_features, old.out_features, bias=old.bias is not None)
    special.load_state_dict(old.state_dict())
    special.requires_grad_(False)
    setattr(parent, name, special)
    with pytest.warns(UserWarning, match=r"1 frozen layer\(s\) subclass nn.Linear.*\(ScaledLinear\)"):
        counts = quantize_frozen(model, "int8")
    assert counts["skipped"] == 1
    assert counts["quantized"] == sum(isinstance(m, QuantizedLinear) for m in model.modules()) > 0
    assert getattr(parent, name) is special and not is_quantized(special.weight)


def test_falcons_linear_subclass_is_packed_and_computes_as_before():
    """`FalconLinear` subclasses nn.Linear with F.linear's forward: quantize_frozen packs it (it was skipped, leaving
    every Falcon projection in floating point), and the int8 model stays close to the float one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from flamingo.tiny import tiny_image_processor, tiny_tokenizer, tiny_vision

    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model("falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model, processor = from_backbones(tiny_vision(), AutoModelForCausalLM.from_config(config).eval(), tokenizer,
                                      tiny_flamingo_config(), image_processor=tiny_image_processor())
    set_gates(model, 0.5)
    batch = processor("<image>Question: what is in the image? Short answer:", images=[random_image(0)])
    with torch.no_grad():
        before = model.eval()(**batch).logits
    counts = quantize_frozen(model, "int8")
    falcon = [m for m in model.lm.modules() if type(m).__name__ == "FalconLinear"]
    assert counts["skipped"] == 0 and not falcon  # every projection replaced by a QuantizedLinear
    with torch.no_grad():
        after = model(**batch).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()
