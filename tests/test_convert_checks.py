"""What a conversion checks before it reads or writes: the OpenFlamingo tokenizer and whole-state tensors, a Hub
repository's type before its weights, files that are no state dict, an adapter's named base, the dtype a conversion
reads in, and where `load_model` reads a source from (a local directory before a published name, `revision`)."""

import copy
import json
import logging

import pytest
import torch

from flamingo.build import from_backbones
from flamingo.cli import main
from flamingo.convert import auto, convert_openflamingo, idefics, openflamingo
from flamingo.convert.mmgpt import read_finetune
from flamingo.convert.openflamingo import PUBLISHED, published_openflamingo
from flamingo.convert.to_openflamingo import LM_UNNAMED, openflamingo_recipe, openflamingo_state
from flamingo.runtime.hub import local_dir
from flamingo.tiny import tiny_flamingo_config, tiny_image_processor, tiny_lm, tiny_tokenizer, tiny_vision

# the sizes OpenFlamingo's factory builds (heads of 64: what `infer_config` reads a checkpoint with)
FACTORY = dict(num_latents=64, resampler_depth=6, resampler_heads=8, resampler_head_dim=64, xattn_heads=8,
               xattn_head_dim=64, ffw_mult=4, xattn_every=2)


@pytest.fixture(scope="module")
def ours():
    """(a model of ours on tiny llama / CLIP backbones, its processor, its OpenFlamingo checkpoint state: the table
    with the 3 added rows, the LM as it was before: its table the tokenizer's 300 rows)."""
    torch.manual_seed(0)
    lm = tiny_lm("llama", vocab_size=300)
    model, processor = from_backbones(tiny_vision(), copy.deepcopy(lm), tiny_tokenizer(),
                                      tiny_flamingo_config(**FACTORY), image_processor=tiny_image_processor())
    with torch.no_grad():
        model.new_token_embeddings.normal_(0, 0.5)
        for block in model.xattn:
            block.attn_gate.fill_(0.4)
    return model, processor, openflamingo_state(model), lm


def _convert(ours, state=None, tokenizer=None, **kwargs):
    model, processor, base, lm = ours
    return convert_openflamingo(dict(state if state is not None else base), copy.deepcopy(model.vision),
                                copy.deepcopy(lm), tokenizer or tiny_tokenizer(),
                                image_processor=processor.image_processor, **kwargs)


@pytest.fixture(scope="module")
def of_files(ours, tmp_path_factory):
    """The checkpoint as a file, and the backbones as directories (the LM's with its own tokenizer)."""
    model, processor, state, lm = ours
    root = tmp_path_factory.mktemp("of")
    torch.save(state, root / "checkpoint.pt")
    model.vision.save_pretrained(root / "vision")
    processor.image_processor.save_pretrained(root / "vision")
    lm.save_pretrained(root / "lm")
    tiny_tokenizer().save_pretrained(root / "lm")
    return root


# -- the tokenizer -------------------------------------------------------------------------------------------------


def test_a_tokenizer_already_holding_the_tokens_is_refused_by_the_converter_itself(ours, monkeypatch):
    """The tokenizer saved beside a model of ours already holds `<image>`: nothing is added, and the checkpoint's
    rows for the tokens lie past the LM's table. Refused naming the tokenizer, even where `from_backbones` would
    let it through."""
    from flamingo import build

    saved = ours[1].tokenizer
    monkeypatch.setattr(build, "check_token_rows", lambda *args, **kwargs: None, raising=False)
    with pytest.raises(ValueError, match="the tokenizer already holds Flamingo's tokens .* past the LM's 300: .*"
                                         "Pass the LM's own tokenizer"):
        _convert(ours, tokenizer=copy.deepcopy(saved))


def test_the_lm_own_tokenizer_converts(ours):
    model, _ = _convert(ours)
    assert model.config.num_new_tokens == ours[0].config.num_new_tokens


# -- whole-state checkpoints: every backbone tensor has its place --------------------------------------------------


@pytest.mark.parametrize("extra", [
    {"lang_encoder.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 32),
     "lang_encoder.model.layers.0.self_attn.q_proj.lora_B.weight": (32, 4)},
    {"lang_encoder.model.adapter.weight": (32, 32)},
    {"lang_encoder.model.layers.0.self_attn.q_proj.bias": (32,)},
    {"lang_encoder.model.norm.weight": (48,)},  # another LM's width
    {"lang_encoder.old_decoder_blocks.9.mlp.up_proj.weight": (64, 32)},  # a layer the LM lacks
    {"vision_encoder.tower.adapter.weight": (32,)},
    {"vision_encoder.transformer.resblocks.7.ln_1.weight": (32,)},  # past the tower's 2 layers
], ids=["lora", "lm-module", "lm-bias", "lm-shape", "lm-layer", "vision-module", "vision-layer"])
def test_a_backbone_tensor_with_no_place_is_refused_not_dropped(ours, extra):
    state = {**ours[2], **{k: torch.ones(shape) for k, shape in extra.items()}}
    with pytest.raises(ValueError, match=f"has no place for: \\[{repr(sorted(extra)[0])[:40]}"):
        _convert(ours, state)


def test_a_whole_state_checkpoint_converts_with_its_layer_copies_compared(ours):
    """A `state_dict()` of OpenFlamingo's model: wrapped layers and `old_decoder_blocks` name the LM's layers; a
    copy that differs from the given LM is refused."""
    _, _, base, lm = ours
    lm = lm.state_dict()
    whole = {**base, "lang_encoder.model.norm.weight": lm["model.norm.weight"].clone()}
    whole.update({f"lang_encoder.old_decoder_blocks.{i}.mlp.down_proj.weight":
                  lm[f"model.layers.{i}.mlp.down_proj.weight"].clone() for i in range(4)})
    _convert(ours, whole)
    whole["lang_encoder.old_decoder_blocks.0.mlp.down_proj.weight"] = torch.zeros_like(
        whole["lang_encoder.old_decoder_blocks.0.mlp.down_proj.weight"])
    with pytest.raises(ValueError, match="its tensors differ from the given LM's .*layers.0.mlp.down_proj"):
        _convert(ours, whole)


# -- files that are no state dict ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content,words", [
    (torch.ones(3), "holds a Tensor, not a state dict"), ([torch.ones(3)], "holds a list, not a state dict"),
    (None, "weights-only torch checkpoint: EOFError"),
])
def test_a_file_that_is_no_state_dict_is_refused_by_name(tmp_path, content, words):
    path = tmp_path / "checkpoint.pt"
    if content is None:
        path.write_bytes(b"")
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=words):
        convert_openflamingo(str(path), "vision", "lm")
    with pytest.raises(ValueError, match=words):
        read_finetune(str(path))


# -- the export recipe ---------------------------------------------------------------------------------------------


def test_the_recipe_names_what_to_fill_in_when_the_model_names_no_lm(ours):
    model = copy.deepcopy(ours[0])
    model.config.lm_name_or_path = None  # a converted OpenFlamingo whose LM's table was cut
    model.config.vision_name_or_path = None  # a converted Otter's tower, built from its checkpoint
    recipe = openflamingo_recipe(model, ours[2])["create_model_and_transforms"]
    assert recipe["lang_encoder_path"] == recipe["tokenizer_path"] == LM_UNNAMED
    assert "LM" in LM_UNNAMED and json.loads(json.dumps(recipe)) == recipe
    for key in ("clip_vision_encoder_path", "clip_vision_encoder_pretrained"):
        assert recipe[key].startswith("<the open_clip ") and "None" not in recipe[key], recipe[key]


# -- wrapper prefixes, the LM's kind -------------------------------------------------------------------------------


@pytest.mark.parametrize("key,expected", [
    ("module.perceiver.latents", "perceiver.latents"),
    ("_orig_mod.module.perceiver.latents", "perceiver.latents"),
    ("_fsdp_wrapped_module.perceiver.latents", "perceiver.latents"),
    ("lang_encoder._fsdp_wrapped_module.model.layers.1._checkpoint_wrapped_module.gated_cross_attn_layer.attn_gate",
     "lang_encoder.gated_cross_attn_layers.1.attn_gate"),
    ("_fsdp_wrapped_module.lang_encoder._fsdp_wrapped_module.model.embed_tokens.weight",
     "lang_encoder.model.embed_tokens.weight"),
    ("lang_encoder.transformer.blocks.0._orig_mod.attn.Wqkv.weight",
     "lang_encoder.transformer.blocks.0.attn.Wqkv.weight"),
    ("lang_encoder.model.submodule.weight", "lang_encoder.model.submodule.weight"),  # `module.` inside a name stays
])
def test_ddp_fsdp_checkpoint_and_compile_wrappers_are_stripped(key, expected):
    assert openflamingo.canonical_key(key) == expected


def test_an_lm_that_is_no_causal_lm_is_named(of_files, tmp_path, capsys):
    """The vision tower given as the LM: one line naming the directory and its model type, not transformers' list of
    every causal LM class."""
    from flamingo.model.backbones import load_lm

    with pytest.raises(ValueError, match="is a 'clip_vision_model' model \\(CLIPVisionConfig\\), not a causal LM"):
        load_lm(str(of_files / "vision"))
    assert main(["convert", "open-flamingo", "--checkpoint", str(of_files / "checkpoint.pt"), "--vision",
                 str(of_files / "vision"), "--lm", str(of_files / "vision"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"the LM {str(of_files / 'vision')!r} is a 'clip_vision_model' model" in err and "GPT2Config" not in err


# -- dtype ---------------------------------------------------------------------------------------------------------


def test_a_named_lm_is_read_in_the_dtype_asked_for(ours, of_files, tmp_path, monkeypatch):
    """`--dtype bf16` loads the LM in bf16 (no float32 copy first), and the CLI passes it on."""
    dtypes = []
    load = openflamingo.load_openflamingo_lm

    def spy(source, *, torch_dtype=None):
        dtypes.append(torch_dtype)
        return load(source, torch_dtype=torch_dtype)

    monkeypatch.setattr(openflamingo, "load_openflamingo_lm", spy)
    model, _ = convert_openflamingo(str(of_files / "checkpoint.pt"), str(of_files / "vision"), str(of_files / "lm"),
                                    torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and dtypes == [torch.bfloat16]
    assert main(["convert", "open-flamingo", "--checkpoint", str(of_files / "checkpoint.pt"), "--vision",
                 str(of_files / "vision"), "--lm", str(of_files / "lm"), "--dtype", "bf16",
                 "--out", str(tmp_path / "out")]) == 0
    assert dtypes == [torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("given,expected", [("bfloat16", torch.bfloat16), ("auto", None), ("fp16", torch.float16),
                                            (torch.float32, torch.float32)])
def test_load_model_takes_dtype_names(tmp_path, monkeypatch, given, expected):
    (tmp_path / "flamingo_config.json").write_text("{}")
    seen = {}
    monkeypatch.setattr(auto, "load_pretrained", lambda source, **kwargs: seen.update(kwargs) or ("m", "p"))
    auto.load_model(str(tmp_path), torch_dtype=given)
    assert seen["torch_dtype"] == expected


@pytest.mark.parametrize("given", ["cuda", "int8", torch.int64])
def test_load_model_refuses_other_dtypes_before_reading(tmp_path, monkeypatch, given):
    monkeypatch.setattr(auto, "checkpoint_format", lambda *args: pytest.fail("read before the dtype was checked"))
    with pytest.raises(ValueError, match="torch_dtype"):
        auto.load_model(str(tmp_path), torch_dtype=given)


# -- where a source is read from -----------------------------------------------------------------------------------


def test_a_local_directory_wins_over_a_published_name(tmp_path, monkeypatch):
    name = sorted(PUBLISHED)[0]
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / "flamingo_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert auto.checkpoint_format(name) == "flamingo"
    monkeypatch.chdir(tmp_path / name)
    assert auto.checkpoint_format(name) == "open-flamingo"  # no such path here: the published checkpoint


def test_a_revision_of_a_local_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="revision 'v2' .* is a local directory"):
        local_dir(str(tmp_path), "model", revision="v2")
    (tmp_path / "flamingo_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a local directory"):
        auto.load_model(str(tmp_path), revision="v2")
    assert local_dir(str(tmp_path), "model") == str(tmp_path)


def test_the_revision_reaches_the_published_checkpoint(monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: calls.append((args, kwargs)))
    name = sorted(PUBLISHED)[0]
    published_openflamingo(name, revision="abc")
    assert calls[-1][1]["revision"] == "abc"

    class Converting(Exception):
        pass

    def convert(*args, **kwargs):
        raise Converting(kwargs)

    monkeypatch.setattr(auto, "convert_openflamingo", convert)
    with pytest.raises(Converting) as caught:
        auto.load_model(name, revision="def", torch_dtype="bf16")
    assert calls[-1][1]["revision"] == "def"
    assert caught.value.args[0]["torch_dtype"] == torch.bfloat16  # read in it, not cast after


# -- a Hub repository's type is read before its weights are downloaded --------------------------------------------


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Hub repositories as local snapshots (name -> {file: JSON}), every download recorded with its patterns."""
    import huggingface_hub

    repos: dict[str, dict] = {}
    fetched: list[tuple[str, list]] = []

    def snapshot_download(repo_id, revision=None, repo_type="model", allow_patterns=None, ignore_patterns=None):
        fetched.append((repo_id, list(allow_patterns or [])))
        directory = tmp_path / "hub" / repo_id.replace("/", "--")
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in repos[repo_id].items():
            (directory / name).write_text(json.dumps(content))
        return str(directory)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repos, fetched


def _weights(fetched):
    return [repo for repo, patterns in fetched if any("safetensors" in p or "bin" in p for p in patterns)]


@pytest.mark.parametrize("source,repos,words", [
    ("org/llama", {"org/llama": {"config.json": {"model_type": "llama"}}}, "describes a 'llama' model, not IDEFICS"),
    ("org/lora", {"org/lora": {"adapter_config.json": {"peft_type": "LORA", "base_model_name_or_path": "org/llama"}},
                  "org/llama": {"config.json": {"model_type": "llama"}}}, "describes a 'llama' model"),
    ("org/q", {"org/q": {"config.json": {"model_type": "idefics", "quantization_config": {"quant_method": "gptq"}}}},
     "saved quantized"),
])
def test_idefics_refuses_another_model_before_downloading_its_weights(fake_hub, source, repos, words):
    fake_hub[0].update(repos)
    with pytest.raises(ValueError, match=words):
        idefics.from_idefics(source)
    assert _weights(fake_hub[1]) == []


def test_otter_refuses_another_model_before_downloading_its_weights(fake_hub):
    from flamingo.convert.otter import from_otter

    fake_hub[0]["org/idefics"] = {"config.json": {"model_type": "idefics"}}
    with pytest.raises(ValueError, match="model_type 'idefics' is not Otter's"):
        from_otter("org/idefics")
    assert _weights(fake_hub[1]) == []


# -- an adapter's base -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base,model,warned", [
    ("org/idefics-9b", "org/idefics-9b-instruct", True), ("org/a", "other/a", True),
    ("org/idefics-9b", "org/idefics-9b", False), (None, "org/x", False),
])
def test_an_adapter_of_another_base_is_warned_about(base, model, warned, caplog):
    with caplog.at_level(logging.WARNING, logger=idefics.__name__):
        idefics.warn_other_base(base, model)
    assert ("the adapter was trained on" in caplog.text) == warned


def test_a_local_copy_of_the_adapters_base_is_the_same_model(tmp_path, caplog):
    copy_dir = tmp_path / "idefics-9b"
    copy_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger=idefics.__name__):
        idefics.warn_other_base("HuggingFaceM4/idefics-9b", str(copy_dir))
        idefics.warn_other_base(str(copy_dir), str(copy_dir) + "/")
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger=idefics.__name__):
        idefics.warn_other_base(str(copy_dir), str(tmp_path))
    assert "the adapter was trained on" in caplog.text


def test_merging_an_adapter_into_another_model_warns(tmp_path, monkeypatch, caplog):
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": "org/base"}))
    save_file({"base_model.model.layer.q_proj.lora_A.weight": torch.ones(2, 4),
               "base_model.model.layer.q_proj.lora_B.weight": torch.ones(4, 2)}, adapter / "adapter_model.safetensors")
    monkeypatch.setattr(idefics, "checkpoint_dir", lambda source, what, **kwargs: str(adapter))
    monkeypatch.setattr(idefics, "checked_idefics_config", lambda source, revision=None: None)
    with caplog.at_level(logging.WARNING, logger=idefics.__name__):
        idefics._adapter_and_base("org/other", str(adapter), None)
    assert "trained on 'org/base' (its base_model_name_or_path) and is merged into 'org/other'" in caplog.text


@pytest.mark.parametrize("argv,target", [
    (["open-flamingo", "--model", sorted(PUBLISHED)[0]], "published_openflamingo"),
    (["idefics", "--model", "org/idefics"], "from_idefics"),
    (["otter", "--model", "org/otter"], "from_otter"),
])
def test_convert_passes_revision_to_the_checkpoint_it_reads(tmp_path, monkeypatch, argv, target):
    """`flamingo convert ... --revision` reaches the Python API's `revision=` (it had no such option)."""
    import flamingo.convert

    class Reading(Exception):
        pass

    def read(*args, **kwargs):
        raise Reading(kwargs)

    monkeypatch.setattr(flamingo.convert, target, read)
    with pytest.raises(Reading) as caught:
        main(["convert", *argv, "--revision", "v1.1", "--out", str(tmp_path / "out")])
    assert caught.value.args[0]["revision"] == "v1.1"


def test_convert_refuses_a_revision_of_a_checkpoint_file(of_files, tmp_path, capsys):
    assert main(["convert", "open-flamingo", "--checkpoint", str(of_files / "checkpoint.pt"), "--vision",
                 str(of_files / "vision"), "--lm", str(of_files / "lm"), "--revision", "v2",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--revision is a version of --model's Hub repository" in capsys.readouterr().err


def test_a_conversion_into_a_saved_model_holding_other_files_is_refused_before_it_runs(of_files, tmp_path, monkeypatch,
                                                                                        capsys):
    """Saving over a checkpoint refuses files no save writes (it would delete them): the CLI says so before the
    conversion, not after minutes of it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "flamingo_config.json").write_text("{}")
    (out / "my_notes.txt").write_text("results of last week")
    monkeypatch.setattr(openflamingo, "load_openflamingo_lm", lambda *a, **k: pytest.fail("converted first"))
    assert main(["convert", "open-flamingo", "--checkpoint", str(of_files / "checkpoint.pt"), "--vision",
                 str(of_files / "vision"), "--lm", str(of_files / "lm"), "--out", str(out)]) == 2
    assert "my_notes.txt, which no save writes" in capsys.readouterr().err
    assert (out / "my_notes.txt").exists()
