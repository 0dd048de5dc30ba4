"""Loading a saved model as it was saved: its dtype, its backbones by absolute path, clear errors for backbones
that moved, tensors that do not fit, and listed tensors the file lacks."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from flamingo import Flamingo, from_backbones, load_pretrained
from flamingo.cli import main
from flamingo.convert import convert_openflamingo, load_openflamingo_lm
from flamingo.model.backbones import load_lm, load_vision_tower
from flamingo.model.flamingo import check_state_shapes
from flamingo.runtime.compat import dtype_kwargs
from flamingo.tiny import random_image, tiny_flamingo_config, tiny_image_processor, tiny_lm, tiny_tokenizer, tiny_vision

from helpers import openflamingo_peer, write_openflamingo_files

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "<image>Question: what colour? Short answer:"


def _save_backbones(root, dtype, lm_overrides=None):
    """A tiny LM and vision tower saved in `dtype` (their configs say so, as most Hub LMs' do)."""
    tok = tiny_tokenizer()
    lm_dir, vision_dir = root / "lm", root / "vision"
    tiny_lm("llama", vocab_size=len(tok), **(lm_overrides or {})).to(dtype).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    tiny_vision("clip").to(dtype).save_pretrained(vision_dir)
    tiny_image_processor("clip").save_pretrained(vision_dir)
    return str(vision_dir), str(lm_dir)


@pytest.fixture(scope="module")
def bf16_backbones(tmp_path_factory):
    return _save_backbones(tmp_path_factory.mktemp("bf16"), torch.bfloat16)


def _dtypes(model):
    return {p.dtype for p in model.parameters()}


def _runs(model, processor):
    """Forward and two greedy tokens, in the model's own dtype."""
    batch = processor(PROMPT, images=[random_image(0)])
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(batch["input_ids"], batch["attention_mask"], images=batch["images"], max_new_tokens=2,
                             do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    return logits


def test_backbones_stored_in_bf16_build_a_float32_model_that_saves_and_loads(bf16_backbones, tmp_path):
    """A new model's backbones are float32 unless asked (transformers 5 would take their configs' bf16, beside our
    float32 blocks: forward failed); saved full or trained-only, it loads back in float32."""
    vision_dir, lm_dir = bf16_backbones
    config = json.loads(open(os.path.join(lm_dir, "config.json")).read())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"  # the key transformers 5 / 4 writes
    assert {p.dtype for p in load_lm(lm_dir).parameters()} == {torch.float32}
    assert {p.dtype for p in load_vision_tower(vision_dir).parameters()} == {torch.float32}
    assert {p.dtype for p in load_lm(lm_dir, **dtype_kwargs(torch.bfloat16)).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_openflamingo_lm(lm_dir).parameters()} == {torch.float32}
    model, processor = from_backbones(vision_dir, lm_dir, config=tiny_flamingo_config())
    assert _dtypes(model) == {torch.float32}
    before = _runs(model.eval(), processor)
    for trained_only in (False, True):
        out = tmp_path / f"m{int(trained_only)}"
        model.save_pretrained(str(out), trained_only=trained_only, processor=processor)
        loaded, loaded_processor = load_pretrained(str(out))
        assert _dtypes(loaded) == {torch.float32}
        assert torch.equal(_runs(loaded, loaded_processor), before)


def test_a_model_saved_in_bf16_loads_in_bf16_unless_asked(bf16_backbones, tmp_path):
    vision_dir, lm_dir = bf16_backbones
    model, processor = from_backbones(vision_dir, lm_dir, config=tiny_flamingo_config())
    model.to(torch.bfloat16)
    for trained_only in (False, True):
        out = tmp_path / f"m{int(trained_only)}"
        model.save_pretrained(str(out), trained_only=trained_only, processor=processor)
        loaded, loaded_processor = load_pretrained(str(out))
        assert _dtypes(loaded) == {torch.bfloat16}
        _runs(loaded, loaded_processor)
        as_float, _ = load_pretrained(str(out), torch_dtype=torch.float32)
        assert _dtypes(as_float) == {torch.float32}


def test_openflamingo_on_a_bf16_lm_converts_in_float32_and_dtype_bf16_loads_in_bf16(tmp_path):
    peer, vision, lm, tok = openflamingo_peer(1)
    args = write_openflamingo_files(peer, vision, lm.to(torch.bfloat16), tok, tmp_path)
    model, processor = convert_openflamingo(args[1], args[3], args[5])
    assert _dtypes(model) == {torch.float32}
    _runs(model, processor)
    out = tmp_path / "conv"
    assert main(["convert", "open-flamingo", *args, "--dtype", "bf16", "--out", str(out)]) == 0
    loaded, loaded_processor = load_pretrained(str(out))
    assert _dtypes(loaded) == {torch.bfloat16}
    _runs(loaded, loaded_processor)
    # the commands load it as saved, or in the --dtype asked for (fp32 too: not taken for the default)
    image = tmp_path / "query.png"
    random_image(0).save(image)
    import flamingo.convert.auto as auto

    seen = []

    def load_model(*a, **kw):
        seen.append(kw["torch_dtype"])
        return load_pretrained(str(out), torch_dtype=kw["torch_dtype"])

    for dtype in ([], ["--dtype", "fp32"]):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(auto, "load_model", load_model)
            assert main(["generate", "--model", str(out), "--prompt", PROMPT, "--image", str(image),
                         "--max-new-tokens", "2", *dtype]) == 0
    assert seen == [None, torch.float32]


def test_relative_backbone_paths_are_stored_absolute(bf16_backbones, tmp_path, monkeypatch):
    """Stored as given, `work/lm` later read as the Hub repository `work/lm` from any other directory."""
    work = tmp_path / "work"
    for part, src in zip(("vision", "lm"), bf16_backbones):
        shutil.copytree(src, work / part)
    monkeypatch.chdir(tmp_path)
    model, processor = from_backbones("work/vision", "work/lm", config=tiny_flamingo_config())
    assert (model.config.vision_name_or_path, model.config.lm_name_or_path) == (str(work / "vision"),
                                                                               str(work / "lm"))
    model.save_pretrained(str(tmp_path / "m"), trained_only=True, processor=processor)
    monkeypatch.chdir(work)
    assert isinstance(Flamingo.from_pretrained(str(tmp_path / "m")), Flamingo)


@pytest.fixture
def trained_only(bf16_backbones, tmp_path):
    model, processor = from_backbones(*bf16_backbones, config=tiny_flamingo_config())
    model.save_pretrained(str(tmp_path / "m"), trained_only=True, processor=processor)
    return tmp_path / "m"


def _edit_config(directory, **changes):
    path = directory / "flamingo_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_backbone_that_is_not_there_is_named_with_its_config_key(trained_only, tmp_path, monkeypatch):
    gone = str(tmp_path / "moved" / "lm")
    _edit_config(trained_only, lm_name_or_path=gone)
    with pytest.raises(FileNotFoundError, match=f"lm_name_or_path '{gone}' is neither a directory nor a Hub name"):
        Flamingo.from_pretrained(str(trained_only))
    with pytest.raises(FileNotFoundError, match="vision tower directory not found: no/such/vision/tower"):
        load_vision_tower("no/such/vision/tower")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a Hub name still goes to the Hub
    _edit_config(trained_only, lm_name_or_path="nobody/no-such-lm")
    with pytest.raises(ValueError, match="cannot load the LM .* from 'nobody/no-such-lm' \\(lm_name_or_path in"):
        Flamingo.from_pretrained(str(trained_only))


def test_a_damaged_lm_directory_is_named(bf16_backbones, tmp_path):
    model, processor = from_backbones(*bf16_backbones, config=tiny_flamingo_config())
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    weights = tmp_path / "m" / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"cannot load the LM of '{tmp_path / 'm'}' from '{tmp_path / 'm' / 'lm'}'"):
        Flamingo.from_pretrained(str(tmp_path / "m"))
    weights.unlink()
    with pytest.raises(ValueError, match="cannot load the LM of .*OSError"):
        Flamingo.from_pretrained(str(tmp_path / "m"))


def test_tensors_that_do_not_fit_are_named_with_both_shapes(trained_only, tmp_path):
    _, wide_lm = _save_backbones(tmp_path / "wide", torch.float32, lm_overrides=dict(hidden_size=64))
    _edit_config(trained_only, lm_name_or_path=wide_lm)  # an LM of another width than the one trained on
    with pytest.raises(ValueError, match=r"does not fit the model: \d+ tensor\(s\) differ in shape \(new_lm_head is "
                                         r"\(\d+, 32\) there, \(\d+, 64\) in the model.*check flamingo_config.json"):
        Flamingo.from_pretrained(str(trained_only))
    with pytest.raises(ValueError, match=r"'x' does not fit the model: 1 tensor\(s\) differ in shape \(a is \(2,\) "
                                         r"there, \(3,\) in the model\): a hint"):
        check_state_shapes({"a": torch.zeros(3), "b": torch.zeros(1)}, {"a": (2,), "c": (5,)}, "'x'", "a hint")


def test_an_edited_config_whose_shapes_differ_is_refused(trained_only):
    _edit_config(trained_only, num_latents=3)
    with pytest.raises(ValueError, match=r"resampler.latents is \(8, 32\) there, \(3, 32\) in the model"):
        Flamingo.from_pretrained(str(trained_only))


def test_tensors_the_config_lists_as_saved_must_be_in_the_file(trained_only):
    _edit_config(trained_only, extra_saved_weights=["lm.model.embed_tokens.weight"])
    with pytest.raises(ValueError, match=r"lacks \['lm.model.embed_tokens.weight'\], which flamingo_config.json "
                                         "lists in extra_saved_weights"):
        Flamingo.from_pretrained(str(trained_only))


def test_from_backbones_in_bf16_builds_every_part_in_bf16(bf16_backbones):
    vision_dir, lm_dir = bf16_backbones
    model, processor = from_backbones(vision_dir, lm_dir, config=tiny_flamingo_config(), torch_dtype=torch.bfloat16)
    assert _dtypes(model) == {torch.bfloat16}
    _runs(model.eval(), processor)


def test_training_from_a_bf16_model_keeps_float32_master_weights(bf16_backbones, tmp_path):
    """`init_from` a model saved in bf16: its trained parameters load in float32 (train.precision casts only the
    frozen parts)."""
    from flamingo.train.config import parse_config
    from flamingo.train.trainer import build_model

    vision_dir, lm_dir = bf16_backbones
    model, processor = from_backbones(vision_dir, lm_dir, config=tiny_flamingo_config(), torch_dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    config = parse_config({"model": {"init_from": str(tmp_path / "saved")},
                           "data": [{"name": "d", "kind": "pairs", "path": "unused.jsonl", "batch_size": 1}],
                           "train": {"steps": 1, "output_dir": str(tmp_path / "run")}})
    trained, _ = build_model(config)
    assert {p.dtype for p in trained.parameters() if p.requires_grad} == {torch.float32}


def test_bf16_backbones_beside_float32_trained_parts_load_as_saved(tmp_path):
    """The layout of `train.frozen_dtype: bf16` (and of from_backbones with bf16 backbones in memory), saved whole:
    by default each part loads in the dtype it was saved in, with the logits it had (the backbones were upcast to
    float32: twice their memory, other logits); `torch_dtype=` still casts it all. A trained-only save names its
    backbones (their own files here float32) and records the dtype they ran in: they load as the run held them."""
    from flamingo.model.quantize import cast_frozen
    from flamingo.tiny import set_gates

    vision_dir, lm_dir = _save_backbones(tmp_path / "float", torch.float32)
    model, processor = from_backbones(vision_dir, lm_dir, config=tiny_flamingo_config(lm_lora={"r": 2}))
    set_gates(model, 0.9)  # the blocks count in the logits
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained adapters and rows: float32 values that bf16 would round
        for name, p in model.named_parameters():
            if ".lora_" in name or name == "new_token_embeddings":
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    cast_frozen(model, torch.bfloat16)
    model.eval()

    def parts(m):
        return {name: {p.dtype for p in module.parameters()} for name, module in
                (("vision", m.vision), ("lm", m.lm), ("resampler", m.resampler), ("xattn", m.xattn))}

    assert parts(model) == {"vision": {torch.bfloat16}, "lm": {torch.bfloat16, torch.float32},  # (the adapters)
                            "resampler": {torch.float32}, "xattn": {torch.float32}}
    before = _runs(model, processor)
    model.save_pretrained(str(tmp_path / "whole"), processor=processor)
    loaded, loaded_processor = load_pretrained(str(tmp_path / "whole"))
    assert parts(loaded) == parts(model)
    saved = {n: p for n, p in model.named_parameters() if ".lora_" in n or n == "new_token_embeddings"}
    assert len(saved) > 1 and {p.dtype for p in saved.values()} == {torch.float32}
    assert all(torch.equal(p, saved[n]) for n, p in loaded.named_parameters() if n in saved)  # not rounded on load
    assert torch.equal(_runs(loaded, loaded_processor), before)
    as_float, _ = load_pretrained(str(tmp_path / "whole"), torch_dtype="float32")
    assert _dtypes(as_float) == {torch.float32}
    model.save_pretrained(str(tmp_path / "trained"), trained_only=True, processor=processor)
    trained, trained_processor = load_pretrained(str(tmp_path / "trained"))
    assert parts(trained) == parts(model)
    assert torch.equal(_runs(trained, trained_processor), before)


def _rotary_buffers(model):
    """The LM's rotary frequency buffers by name."""
    return {name: b for name, b in model.named_buffers() if name.endswith(("inv_freq", "original_inv_freq"))}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma"])
def test_a_bf16_load_keeps_the_lms_rotary_frequencies_float32_as_transformers_does(kind, tmp_path):
    """transformers' `from_pretrained(dtype=bf16)` computes the rotary `inv_freq` in float32 and keeps it;
    from_backbones and load_pretrained in bf16 keep the same (a whole-model `.to(bf16)` rounded it: 0.1 ->
    0.10009765625, angles off by ~0.02 rad per 200 tokens), and so the logits of a long prompt are HF's bf16 LM's. The
    LM's other buffers (Gemma's embed_scale) follow the dtype there, and here."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    vision_dir, lm_dir = tmp_path / "vision", tmp_path / "lm"
    tiny_lm(kind, vocab_size=len(tok)).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    tiny_vision("clip").save_pretrained(vision_dir)
    tiny_image_processor("clip").save_pretrained(vision_dir)
    hf = AutoModelForCausalLM.from_pretrained(lm_dir, **dtype_kwargs(torch.bfloat16)).eval()
    expected = {f"lm.{k}": b for k, b in _rotary_buffers(hf).items()}
    assert expected and {b.dtype for b in expected.values()} == {torch.float32}
    ids = torch.randint(0, len(tok), (1, 400), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids).logits

    built, processor = from_backbones(str(vision_dir), str(lm_dir), config=tiny_flamingo_config(),
                                      torch_dtype=torch.bfloat16)
    built.save_pretrained(tmp_path / "saved", processor=processor)
    in_memory, _ = from_backbones(str(vision_dir), hf, config=tiny_flamingo_config(), torch_dtype=torch.bfloat16)
    loaded, _ = load_pretrained(str(tmp_path / "saved"), torch_dtype="bf16")
    for model in (built.eval(), in_memory.eval(), loaded):
        assert _dtypes(model) == {torch.bfloat16}
        got = _rotary_buffers(model)
        assert got.keys() == expected.keys()
        for name, b in got.items():
            assert b.dtype == torch.float32 and torch.equal(b, expected[name]), name
        for name, b in hf.named_buffers():
            ours = model.get_buffer(f"lm.{name}")
            assert ours.dtype == b.dtype and torch.equal(ours, b), name
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert torch.equal(got[..., :want.shape[-1]], want)  # after them: the added tokens' columns
    saved = list((tmp_path / "saved").rglob("*.safetensors"))
    assert saved and not [k for f in saved for k in safe_open(f, "pt").keys() if "inv_freq" in k]  # recomputed
    pytest.importorskip("torchao", reason="int8 frozen weights need torchao")
    int8, _ = load_pretrained(str(tmp_path / "saved"), torch_dtype="bf16", quantize_frozen="int8")
    assert {k: (b.dtype, b.tolist()) for k, b in _rotary_buffers(int8).items()} == {
        k: (b.dtype, b.tolist()) for k, b in expected.items()}
