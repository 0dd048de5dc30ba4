"""LoRA on the LM (`lm_lora`, PEFT adapters injected in place): the model is the bare LM at init and not after a
step, our hooks still run (the xattn blocks see the images), only the adapters train in the LM, save -> load keeps
the logits in both checkpoint modes, merged == unmerged, and `flamingo train` trains them."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from flamingo import Flamingo, from_backbones, load_pretrained
from flamingo.config import FlamingoConfig
from flamingo.model import lora
from flamingo.model.card import model_card
from flamingo.tiny import (
    random_image,
    set_gates,
    tiny_flamingo_config,
    tiny_image_processor,
    tiny_lm,
    tiny_tokenizer,
    tiny_vision,
)
from flamingo.train.optim import make_optimizer

from helpers import interrupted_at
from train_fixtures import save_backbones, train_config, write_datasets

pytest.importorskip("peft")

SPEC = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
PROMPT = "<image>Question: what? Short answer: red.<|endofchunk|><image>Question: and this? Short answer:"


def _perturb_adapters(model) -> None:
    """As if trained: lora_B away from its zero init, so that the adapters change the LM's output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.is_adapter_key(name):
                p.add_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("lm_kind,targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_lora_model_is_the_bare_lm_at_init_and_not_after_a_step(make_model, lm_kind, targets):
    model, processor = make_model(lm_kind, gates=0.0, lm_lora={**SPEC, "target_modules": targets})
    bare = tiny_lm(lm_kind, vocab_size=len(tiny_tokenizer()))  # same seed: the same weights as the model's LM
    assert type(model.lm) is type(bare) and model.decoder_layers_path
    assert any(type(m).__name__ in ("Linear", "Conv1D") and "lora" in type(m).__module__ for m in model.lm.modules())
    text = processor("Question: what is in the image? Short answer: a red circle.")
    with torch.no_grad():
        ref = bare(input_ids=text["input_ids"]).logits
        assert (model(**text).logits[..., :ref.shape[-1]] - ref).abs().max() <= 1e-5

    trained = model.trainable_parameters()
    adapters = {n for n in trained if lora.is_adapter_key(n)}
    assert adapters and all(n.startswith("xattn.") or n.startswith("resampler.") or n.startswith("new_")
                            or n in adapters for n in trained)
    frozen = {n: p.detach().clone() for n, p in model.lm.named_parameters() if not p.requires_grad}
    optimizer = make_optimizer(model, 1e-2, 0.1, (0.9, 0.999), 1e-8)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert all(id(trained[n]) in decayed for n in adapters)  # LoRA matrices decay, like the blocks' matrices
    model.train()
    loss = model(**text, labels=text["input_ids"]).loss
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(**text).logits[..., :ref.shape[-1]] - ref).abs().max() > 1e-4  # text only: LoRA's doing
    assert all(torch.equal(p, frozen[n]) for n, p in model.lm.named_parameters() if not p.requires_grad)


def test_xattn_blocks_still_run_through_the_adapted_layers(make_model):
    """The decoder-layer pre-hooks and the added-token hooks sit on modules PEFT leaves in place: with non-zero
    gates the images change the logits, and gradients reach both the blocks and the adapters."""
    model, processor = make_model("llama", gates=0.5, lm_lora=SPEC)
    _perturb_adapters(model)
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    other = processor(PROMPT, images=[random_image(2), random_image(3)])
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, model(**other).logits)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items()
               if lora.is_adapter_key(n) or n.endswith("attn_gate"))


def test_adapter_dropout_trains_while_the_frozen_lm_stays_in_eval_mode(make_model):
    model, _ = make_model("llama", lm_lora={**SPEC, "dropout": 0.1})
    model.train()
    dropouts = [m for n, m in model.lm.named_modules() if n.endswith("lora_dropout")]
    assert dropouts and all(m.training for m in dropouts) and not model.lm.training
    model.eval()
    assert not any(m.training for m in dropouts)


@pytest.fixture
def backbone_dirs(tmp_path):
    return save_backbones(str(tmp_path))


def _adapted_model(backbone_dirs):
    """A model from the saved backbones with LoRA (adapters perturbed off zero), gates at 0.5, and a two-image batch."""
    from flamingo import from_backbones
    from flamingo.tiny import tiny_flamingo_config

    model, processor = from_backbones(*backbone_dirs, config=tiny_flamingo_config(lm_lora=SPEC))
    set_gates(model, 0.5)
    _perturb_adapters(model)
    model.eval()
    return model, processor, processor(PROMPT, images=[random_image(0), random_image(1)])


@pytest.mark.parametrize("trained_only", [False, True])
def test_save_load_keeps_the_adapters(backbone_dirs, tmp_path, trained_only):
    model, processor, batch = _adapted_model(backbone_dirs)
    with torch.no_grad():
        before = model(**batch).logits
    out = str(tmp_path / "ckpt")
    model.save_pretrained(out, trained_only=trained_only, processor=processor)
    with safe_open(os.path.join(out, "flamingo.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert {n for n in model.trainable_parameters() if lora.is_adapter_key(n)} <= saved
    if not trained_only:  # the lm/ directory is the bare HF LM: no adapters, no PEFT names
        with safe_open(os.path.join(out, "lm", "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if ".lora_" in k or ".base_layer." in k]
        assert torch.equal(load_pretrained(out)[0].lm.state_dict()[
            "model.layers.0.self_attn.q_proj.base_layer.weight"], model.lm.model.layers[0].self_attn.q_proj.weight)
    loaded, _ = load_pretrained(out)
    assert loaded.config.lm_lora == model.config.lm_lora
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, before)


def test_merged_equals_unmerged_and_saves(backbone_dirs, tmp_path):
    model, processor, batch = _adapted_model(backbone_dirs)
    with torch.no_grad():
        unmerged = model(**batch).logits
        model.merge_lora()
        merged = model(**batch).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    assert not lora.has_lora(model.lm) and model.config.lm_lora is None and not hasattr(model.lm, "peft_config")
    assert set(model.lm.state_dict()) == set(tiny_lm("llama", vocab_size=len(tiny_tokenizer())).state_dict())
    assert "lm.model.layers.0.self_attn.q_proj.weight" in model.config.extra_saved_weights
    out = str(tmp_path / "merged")
    model.save_pretrained(out, trained_only=True)  # the merged weights travel as extra_saved_weights
    loaded = Flamingo.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, merged)
    card = " ".join(model_card(out, "merged").split())  # the LM is not the base's any more: the card says so
    changed = sum(k.startswith("lm.") for k in model.config.extra_saved_weights)
    assert f"{changed} of its weight tensors differ from the base's (a merged LoRA's" in card
    with pytest.raises(ValueError, match="no LoRA adapters"):
        model.merge_lora()


def test_a_merge_interrupted_then_run_again_records_every_merged_weight(backbone_dirs, tmp_path, monkeypatch):
    """A Ctrl-C half way through merge_lora, then merge_lora again (which merges the rest): the weights the first
    call merged were never recorded in extra_saved_weights (only at the end of a whole merge), so a trained-only save
    reloaded a model with the base's weights there."""
    model, processor, batch = _adapted_model(backbone_dirs)
    with torch.no_grad():
        unmerged = model(**batch).logits
    layer_class = type(lora._tuner_layers(model.lm)[0][1])
    monkeypatch.setattr(layer_class, "merge", interrupted_at(layer_class.merge, 3))
    with pytest.raises(KeyboardInterrupt):
        model.merge_lora()
    monkeypatch.undo()
    model.merge_lora()
    with torch.no_grad():
        merged = model(**batch).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    assert sum(k.startswith("lm.") for k in model.config.extra_saved_weights) == \
        2 * model.lm.config.num_hidden_layers  # q_proj and v_proj of every layer
    model.save_pretrained(str(tmp_path / "merged"), trained_only=True)
    with torch.no_grad():
        assert torch.equal(Flamingo.from_pretrained(str(tmp_path / "merged"))(**batch).logits, merged)


def test_bad_lora_specs_are_refused_clearly(make_model):
    with pytest.raises(ValueError, match="lm_lora.r must be an integer"):
        FlamingoConfig(lm_lora={"r": 0})
    with pytest.raises(ValueError, match="unknown lm_lora keys"):
        FlamingoConfig(lm_lora={"r": 4, "rank": 4})
    with pytest.raises(ValueError, match="non-empty list"):
        FlamingoConfig(lm_lora={"r": 4, "target_modules": "q_proj"})
    with pytest.raises(ValueError, match="frozen LM"):
        FlamingoConfig(lm_lora={"r": 4}, freeze_lm=False)
    assert FlamingoConfig(lm_lora={"r": 4}).lm_lora == {"r": 4, "alpha": 4, "target_modules": ["q_proj", "v_proj"],
                                                        "dropout": 0.0}
    with pytest.raises(ValueError, match="token tables"):
        make_model("llama", lm_lora={"r": 4, "target_modules": ["embed_tokens"]})
    with pytest.raises(ValueError, match="non-linear modules"):
        make_model("llama", lm_lora={"r": 4, "target_modules": ["q_proj", "self_attn"]})
    with pytest.raises(ValueError, match="name no linear layer"):
        make_model("llama", lm_lora={"r": 4, "target_modules": ["nonexistent_proj"]})
    with pytest.raises(ValueError, match=r"\['v_prj'\] match no module of LlamaForCausalLM"):  # a typo beside a match
        make_model("llama", lm_lora={"r": 4, "target_modules": ["q_proj", "v_prj"]})


def test_lora_adapts_subclasses_of_linear_and_is_the_bare_lm_at_init():
    """Falcon's projections are `FalconLinear(nn.Linear)`: refused as "no linear layer" when the check read the
    class name; PEFT adapts them like any nn.Linear."""
    tokenizer = tiny_tokenizer()

    def falcon():
        config = AutoConfig.for_model("falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()

    spec = {"r": 4, "target_modules": ["query_key_value", "dense"]}
    bare = falcon()
    model, processor = from_backbones(tiny_vision(), copy.deepcopy(bare), tokenizer,
                                      tiny_flamingo_config(lm_lora=spec), image_processor=tiny_image_processor())
    adapted = {n.rpartition(".lora_")[0] for n, _ in model.lm.named_parameters() if lora.is_adapter_key(n)}
    assert len(adapted) == 4 and all(n.rpartition(".")[2] in spec["target_modules"] for n in adapted)
    set_gates(model, 0.0)
    text = processor("Question: what is in the image? Short answer: a red circle.")
    with torch.no_grad():
        ref = bare(input_ids=text["input_ids"]).logits
        assert (model(**text).logits[..., :ref.shape[-1]] - ref).abs().max() == 0


def test_adapters_added_to_a_bf16_frozen_lm_train_in_float32(make_model):
    """cast_frozen(bf16) then apply_lora: PEFT makes an adapter in its base layer's dtype, so they were bf16, with
    bf16 AdamW states, where the trainer keeps them float32. They are float32 now, and the LM stays bf16."""
    from flamingo.model.quantize import cast_frozen

    model, processor = make_model("llama")
    cast_frozen(model, torch.bfloat16)
    lora.apply_lora(model.lm, SPEC)
    adapters = {n: p for n, p in model.lm.named_parameters() if lora.is_adapter_key(n)}
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters.values())
    assert {p.dtype for n, p in model.lm.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    text = processor("Question: what is in the image? Short answer: a red circle.")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**text, labels=text["input_ids"]).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters.values())


def test_adapters_on_an_already_quantized_lm_are_refused_with_the_order_to_use(make_model):
    """apply_lora after quantize_frozen said the targets named no linear layer, though q_proj is one (a
    QuantizedLinear): the message now says to add the adapters first."""
    pytest.importorskip("torchao")
    from flamingo.model.quantize import quantize_frozen

    model, _ = make_model("llama")
    quantize_frozen(model, "int8")
    with pytest.raises(ValueError, match=r"the LM is already quantized \(model.layers.0.self_attn.q_proj is a "
                                         r"QuantizedLinear\): add LoRA adapters before quantizing"):
        lora.apply_lora(model.lm, {"r": 4})


@pytest.mark.slow
def test_flamingo_train_trains_the_adapters(tmp_path):
    """`flamingo train` with model.flamingo.lm_lora: the adapters are in the optimizer, they change, the LM's own
    weights do not, and the trained-only final checkpoint holds them and loads to the same logits."""
    from flamingo.cli import main
    from flamingo.train.config import load_config
    from flamingo.train.trainer import Trainer

    root = str(tmp_path)
    vision, lm = save_backbones(root)
    data = write_datasets(os.path.join(root, "data"), n_pairs=16, n_docs=4)
    path = train_config(root, vision, lm, data, steps=3, out=os.path.join(root, "run"), interleaved=False, lr=1e-2)
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["model"]["flamingo"]["lm_lora"] = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    trainer = Trainer(load_config(path, ["train.output_dir=" + os.path.join(root, "probe")]))
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    adapters = {n: p for n, p in trainer.model.named_parameters() if lora.is_adapter_key(n)}
    assert adapters and all(id(p) in in_optimizer for p in adapters.values())

    assert main(["train", path, "train.progress=false"]) == 0
    out = os.path.join(root, "run", "final")
    with safe_open(os.path.join(out, "flamingo.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    b_weights = [k for k in saved if ".lora_B." in k]
    assert set(adapters) <= set(saved) and b_weights
    assert any(saved[k].abs().max() > 0 for k in b_weights)  # lora_B left its zero init: the adapters trained
    assert not [k for k in saved if k.startswith("lm.") and not lora.is_adapter_key(k)]  # the LM's weights: no
    model, processor = load_pretrained(out)
    batch = processor("<image>a red square.", images=[os.path.join(os.path.dirname(data["pairs"]), "images",
                                                                   "p0.png")])
    assert lora.has_lora(model.lm)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_adapters_train_on_a_quantized_frozen_lm(make_model, mode):
    """QLoRA's setting: the adapted layers' base weights quantized (quantize_frozen), the adapters in fp32 and
    trained; the loss is the unquantized model's up to the quantization error."""
    pytest.importorskip("torchao")
    from flamingo.model.quantize import is_quantized, quantize_frozen

    plain, processor = make_model("llama", gates=0.5, lm_lora=SPEC)
    model, _ = make_model("llama", gates=0.5, lm_lora=SPEC, quantize_frozen=mode)
    quantize_frozen(model)
    q_proj = model.lm.model.layers[0].self_attn.q_proj
    assert is_quantized(q_proj.base_layer.weight) and not is_quantized(q_proj.lora_A.default.weight)
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    loss = model(**batch, labels=batch["input_ids"]).loss
    with torch.no_grad():
        reference = float(plain(**batch, labels=batch["input_ids"]).loss)
    assert abs(float(loss.detach()) - reference) < 0.05
    loss.backward()
    assert q_proj.lora_B.default.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="merge before quantizing"):
        model.merge_lora()


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(make_model):
    grads = []
    for checkpointing in (False, True):
        model, processor = make_model("llama", gates=0.5, lm_lora=SPEC)
        _perturb_adapters(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        batch = processor(PROMPT, images=[random_image(0), random_image(1)])
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if lora.is_adapter_key(n)})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_a_merged_model_refuses_what_its_final_save_or_export_would_lose(backbone_dirs, tmp_path):
    """A merged LoRA's weights are saved as extra_saved_weights: new adapters (renaming them) or quantization
    (packing them) made the final save of a whole run fail after its last step, and the OpenFlamingo export dropped
    them. The trainer refuses before step 1; the export names them."""
    from flamingo.convert.to_openflamingo import incompatibilities
    from flamingo.model.quantize import quantize_frozen
    from flamingo.train.trainer import check_final_save

    model, _, _ = _adapted_model(backbone_dirs)
    model.merge_lora()
    check_final_save(model, None)  # as merged: it saves
    assert any("changed LM weights ['lm.model.layers.0.self_attn.q_proj.weight'" in p for p in incompatibilities(model))
    out = str(tmp_path / "merged")
    model.save_pretrained(out, trained_only=True)
    again = Flamingo.from_pretrained(out)
    lora.apply_lora(again.lm, SPEC)  # what model.flamingo.lm_lora does to init_from
    with pytest.raises(ValueError, match="would be saved from layers that model.flamingo.lm_lora wraps"):
        check_final_save(again, None)
    packed = Flamingo.from_pretrained(out)
    quantize_frozen(packed, "int8")
    with pytest.raises(ValueError, match="would be saved from layers that .*quantize_frozen packs"):
        check_final_save(packed, None)
    with pytest.raises(ValueError, match="train.save_trained_only: true or null"):
        check_final_save(packed, False)  # quantized backbones are never saved whole


def test_a_saved_model_whose_target_list_names_a_module_it_lacks_still_loads(make_model, tmp_path, caplog):
    """A target list written for several architectures (`query_key_value` beside q/v on a Llama) matched what it
    could before names matching nothing were refused: such a saved model loads with its adapters, and warns."""
    model, processor = make_model("llama", lm_lora={**SPEC, "target_modules": ["q_proj"]})
    _perturb_adapters(model)
    model.config.lm_lora = {**model.config.lm_lora, "target_modules": ["q_proj", "query_key_value"]}  # as saved then
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    with caplog.at_level("WARNING", logger="flamingo.model.lora"):
        loaded, _ = load_pretrained(str(tmp_path / "m"))
    assert "['query_key_value'] match no module" in caplog.text
    text = processor("<image>Question: what? Short answer:", images=[random_image(0)])
    with torch.no_grad():
        assert torch.equal(loaded(**text).logits, model(**text).logits)


def test_a_run_from_an_adapted_model_keeps_training_its_adapters_under_the_same_spec(make_model, tmp_path):
    """A second stage from a LoRA-tuned model with the first stage's config (the same `lm_lora`) trains the saved
    adapters, its dropout the config's; a spec with another r, alpha or targets is refused naming both specs and
    the remedy."""
    from flamingo.train.config import load_config
    from flamingo.train.trainer import Trainer

    from helpers import chat_run_config

    model, processor = make_model("llama", lm_lora=SPEC)
    _perturb_adapters(model)
    saved = str(tmp_path / "tuned")
    model.save_pretrained(saved, processor=processor)
    config = str(chat_run_config(tmp_path, saved, steps=1))
    trainer = Trainer(load_config(config, ["train.progress=false", "model.flamingo={lm_lora: {r: 4, alpha: 8, "
                                           "target_modules: [v_proj, q_proj], dropout: 0.1}}"]))
    adapters = {n: p for n, p in trainer.model.named_parameters() if lora.is_adapter_key(n)}
    tuned = dict(model.named_parameters())
    assert adapters and all(p.requires_grad and torch.equal(p, tuned[n]) for n, p in adapters.items())
    assert trainer.model.config.lm_lora == {**SPEC, "dropout": 0.1}
    dropouts = [m for n, m in trainer.model.lm.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in dropouts)
    before = {n: p.detach().clone() for n, p in adapters.items()}
    trainer.train_step()
    assert any(not torch.equal(p, before[n]) for n, p in adapters.items())  # the saved adapters train on
    with pytest.raises(ValueError, match=r"already holds LoRA adapters \(r=4, alpha=8 on q_proj, v_proj\), and "
                                         r"model.flamingo.lm_lora asks for other ones \(r=8, alpha=8 on q_proj, "
                                         r"v_proj\): leave model.flamingo.lm_lora out, or give theirs"):
        Trainer(load_config(config, ["model.flamingo={lm_lora: {r: 8, alpha: 8}}"]))


def test_generating_with_active_dropout_is_warned_about_once(monkeypatch):
    """`from_backbones` returns a model in training mode (PyTorch's convention): with LoRA dropout its `generate`
    and `score` were random, unsaid. They warn (once per call kind); in eval mode, or with no dropout, they do not."""
    import warnings

    from flamingo.model import generation
    from flamingo.tiny import tiny_flamingo

    monkeypatch.setattr(generation, "_DROPOUT_TOLD", set())
    model, processor = tiny_flamingo(lm_lora={"r": 2, "target_modules": ["q_proj"], "dropout": 0.5})
    batch = processor("<image>A photo of", images=[random_image(0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(**batch, max_new_tokens=2)  # eval mode
        tiny_flamingo()[0].train().generate(**batch, max_new_tokens=2)  # training mode, no dropout anywhere
    model.train()
    with pytest.warns(UserWarning, match=r"generate on a model in training mode: its dropout \(.*lora_dropout") as told:
        model.generate(**batch, max_new_tokens=2)
    with pytest.warns(UserWarning, match="score on a model in training mode") as told_score:
        model.score(batch["input_ids"], [[5]], images=batch["images"], num_media=batch["num_media"])
    assert told[0].filename == told_score[0].filename == __file__  # the caller's line, not flamingo's or torch's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(**batch, max_new_tokens=2)  # said once
