"""Foreign checkpoints that are damaged, incomplete or of another model, and output paths that hold other files:
each is refused with a ValueError naming the file, tensor or path (the CLI's exit 2), before any work is done or
anything is written; never a traceback, a silently dropped tensor or a deleted file."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_idefics_equal import save_peer

from flamingo.cli import main
from flamingo.convert import from_idefics
from flamingo.convert.adapters import read_lora_adapter
from flamingo.convert.checkpoints import check_backbones_dir
from flamingo.convert.to_idefics import check_idefics_out
from flamingo.runtime.checkpoint_io import check_replaceable


@pytest.fixture(scope="module")
def idefics_dir(tmp_path_factory):
    """A tiny IDEFICS directory (tests/test_idefics_equal.py's), as `save_pretrained` writes it."""
    return save_peer(tmp_path_factory.mktemp("idefics") / "model", "float", False)


def _copy(source, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def _edit_tensors(directory, edit):
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    path.write_text(json.dumps(config))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- output paths ------------------------------------------------------------------------------------------------


def test_only_an_earlier_write_of_the_same_kind_is_replaceable(tmp_path):
    llama = tmp_path / "llama"  # any transformers directory holds a config.json
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="is not an earlier IDEFICS export of flamingo \\(no flamingo_export.json"):
        check_idefics_out(str(llama))
    check_replaceable(str(llama), "config.json", "a directory with a config")  # no predicate: the marker decides
    (llama / "config.json").write_text(json.dumps({"model_type": "idefics"}))  # a downloaded IDEFICS: kept too
    with pytest.raises(ValueError, match="no flamingo_export.json"):
        check_idefics_out(str(llama))
    (llama / "flamingo_export.json").write_text("{}")
    check_idefics_out(str(llama))  # an earlier export
    check_idefics_out(str(tmp_path / "new"))

    saved = tmp_path / "saved"  # a saved Flamingo holds lm/config.json too, and more
    (saved / "lm").mkdir(parents=True)
    (saved / "lm" / "config.json").write_text("{}")
    (saved / "flamingo_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a converted model's backbones"):
        check_backbones_dir(str(saved))
    os.remove(saved / "flamingo_config.json")
    (saved / "vision").mkdir()
    check_backbones_dir(str(saved))


def test_convert_checks_out_and_backbones_before_converting(idefics_dir, tmp_path, monkeypatch, capsys):
    import flamingo.convert

    def never(*args, **kwargs):
        raise AssertionError("the conversion ran before --out/--backbones were checked")

    monkeypatch.setattr(flamingo.convert, "from_idefics", never)
    monkeypatch.setattr(flamingo.convert, "convert_openflamingo", never)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    command = ["convert", "idefics", "--model", str(idefics_dir)]

    assert main([*command, "--out", str(busy), "--backbones", str(tmp_path / "bb"), "--trained-only"]) == 2
    assert "is not a saved Flamingo model" in capsys.readouterr().err
    assert not (tmp_path / "bb").exists()
    assert main([*command, "--out", str(tmp_path / "o"), "--backbones", str(busy), "--trained-only"]) == 2
    assert "is not a converted model's backbones" in capsys.readouterr().err
    assert main([*command, "--out", str(tmp_path / "o"), "--backbones", str(tmp_path / "o" / "bb")]) == 2
    assert "overlap" in capsys.readouterr().err
    earlier = idefics_dir.parent  # an earlier save around the source: replacing it would delete the source
    (earlier / "flamingo_config.json").write_text("{}")
    try:
        assert main([*command, "--out", str(earlier)]) == 2
        assert "which it is made from" in capsys.readouterr().err
    finally:
        os.remove(earlier / "flamingo_config.json")
    assert main(["convert", "open-flamingo", "--checkpoint", "c.pt", "--vision", "v", "--lm", "l",
                 "--out", str(busy)]) == 2
    assert "is not a saved Flamingo model" in capsys.readouterr().err
    assert sorted(os.listdir(busy)) == ["notes.txt"] and not (tmp_path / "o").exists()


# -- damaged or incomplete IDEFICS checkpoints and adapters --------------------------------------------------------


def test_a_truncated_idefics_checkpoint_names_its_file(idefics_dir, tmp_path, capsys):
    model = _copy(idefics_dir, tmp_path)
    _truncate(model / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors' is not a readable safetensors file"):
        from_idefics(str(model))
    assert main(["convert", "idefics", "--model", str(model), "--out", str(tmp_path / "out")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize("case,words", [
    ("missing_block_tensor", "has no tensor 'model.gated_cross_attn_layers.1.mlp.up_proj.weight'"),
    ("missing_added_rows", "has no tensor 'model.embed_tokens.additional_embedding.weight'"),
    ("missing_added_head_rows", "lacks lm_head.additional_fc.weight \\(its config does not tie the head"),
    ("interval_of_other_tensors", "has no tensor 'model.gated_cross_attn_layers.2."),
    ("extra_tensor", "has no place for: \\['model.something_else.weight'\\]"),
    ("extra_head_bias", "has no place for: \\['lm_head.bias'\\]"),
    ("config_of_another_width", "lm.model.layers.0.input_layernorm.weight is \\(32,\\) there, \\(64,\\) in the model"),
    ("no_config", "no config.json in"),
    ("truncated_config", "config.json' is not a JSON config object"),
    ("no_tokenizer", "no tokenizer files"),
])
def test_an_incomplete_or_mismatched_idefics_checkpoint_is_refused_by_name(idefics_dir, tmp_path, case, words):
    model = _copy(idefics_dir, tmp_path)
    edits = {
        "missing_block_tensor": lambda: _edit_tensors(
            model, lambda s: s.pop("model.gated_cross_attn_layers.1.mlp.up_proj.weight")),
        "missing_added_rows": lambda: _edit_tensors(
            model, lambda s: s.pop("model.embed_tokens.additional_embedding.weight")),
        "missing_added_head_rows": lambda: _edit_tensors(model, lambda s: s.pop("lm_head.additional_fc.weight")),
        "interval_of_other_tensors": lambda: _edit_config(model / "config.json", cross_layer_interval=1),
        "extra_tensor": lambda: _edit_tensors(
            model, lambda s: s.__setitem__("model.something_else.weight", torch.zeros(2))),
        "extra_head_bias": lambda: _edit_tensors(model, lambda s: s.__setitem__("lm_head.bias", torch.zeros(2))),
        "config_of_another_width": lambda: _edit_config(model / "config.json", hidden_size=64),
        "no_config": lambda: os.remove(model / "config.json"),
        "truncated_config": lambda: _truncate(model / "config.json"),
        "no_tokenizer": lambda: [os.remove(model / f) for f in ("tokenizer.json", "tokenizer_config.json")],
    }
    edits[case]()
    with pytest.raises(ValueError, match=words):
        from_idefics(str(model))


def test_a_tied_idefics_takes_the_head_from_the_embedding(idefics_dir, tmp_path):
    """`tie_word_embeddings: true`: IDEFICS's `tie_weights` ties the head and its added rows to the input table, and
    its save holds neither head tensor."""
    model = _copy(idefics_dir, tmp_path)
    _edit_config(model / "config.json", tie_word_embeddings=True)
    _edit_tensors(model, lambda s: [s.pop(k) for k in ("lm_head.weight", "lm_head.additional_fc.weight")])
    ours, _ = from_idefics(str(model))
    assert torch.equal(ours.new_lm_head, ours.new_token_embeddings)


def _adapter_dir(tmp_path, **config):
    """A PEFT LoRA adapter directory of one Linear (rank 2), its config changed by `config` (None: key removed)."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": "org/base"}
    base.update(config)
    (directory / "adapter_config.json").write_text(json.dumps({k: v for k, v in base.items() if v is not None}))
    save_file({"base_model.model.layer.q_proj.lora_A.weight": torch.ones(2, 4),
               "base_model.model.layer.q_proj.lora_B.weight": torch.ones(4, 2)},
              directory / "adapter_model.safetensors")
    return directory


@pytest.mark.parametrize("case,words", [
    ("no_r", "adapter_config.json' gives no positive 'r'"),
    ("no_alpha", "adapter_config.json' gives no 'lora_alpha'"),
    ("truncated_config", "adapter_config.json' is not valid JSON"),
    ("truncated_weights", "adapter_model.safetensors' is not a readable safetensors file"),
])
def test_a_damaged_adapter_is_refused_by_name(tmp_path, case, words):
    directory = _adapter_dir(tmp_path)
    assert read_lora_adapter(str(directory)).lora  # the fixture itself reads
    if case.startswith("truncated"):
        _truncate(directory / ("adapter_config.json" if case == "truncated_config" else "adapter_model.safetensors"))
    else:
        _edit_config(directory / "adapter_config.json", **{"r" if case == "no_r" else "lora_alpha": None})
    with pytest.raises(ValueError, match=words):
        read_lora_adapter(str(directory))


def test_the_revision_is_the_base_models_when_an_adapter_is_given(tmp_path, monkeypatch):
    from flamingo.convert import idefics

    adapter = _adapter_dir(tmp_path)
    calls = []

    def checkpoint_dir(source, what, *, revision=None, allow_bin=True):
        calls.append((source, revision))
        return str(adapter)

    monkeypatch.setattr(idefics, "checkpoint_dir", checkpoint_dir)
    monkeypatch.setattr(idefics, "checked_idefics_config", lambda source, revision=None: calls.append(
        ("config", source, revision)))
    lora, base, revision = idefics._adapter_and_base("org/base", str(adapter), "v2")
    assert lora is not None and (base, revision) == ("org/base", "v2")  # read_idefics fetches it at v2
    assert calls == [("config", "org/base", "v2"), (str(adapter), None)]  # its config first, no weights


# -- OpenFlamingo checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openflamingo():
    """(checkpoint state: perceiver, blocks and the whole input table, vision tower, LM, tokenizer) of a tiny
    OpenFlamingo with a block before every layer."""
    pytest.importorskip("einops_exts", reason="the OpenFlamingo peer needs einops-exts")
    from helpers import openflamingo_peer

    peer, vision, lm, tok = openflamingo_peer(1, seed=3)
    state = {k: v.clone() for k, v in peer.state_dict().items()
             if k.startswith(("perceiver.", "lang_encoder.gated")) or k == "lang_encoder.model.embed_tokens.weight"}
    return state, vision, lm, tok


def _convert(openflamingo, edit=None, tokenizer=None, v1=False):
    import copy

    from flamingo.convert import convert_openflamingo
    from flamingo.tiny import tiny_image_processor

    state, vision, lm, tok = openflamingo
    state = dict(state)
    if edit is not None:
        edit(state)
    return convert_openflamingo(state, copy.deepcopy(vision), copy.deepcopy(lm), tokenizer or copy.deepcopy(tok),
                                image_processor=tiny_image_processor(), attend_next_image=v1)


@pytest.mark.parametrize("key", ["perceiver.layers.0.0.to_q.bias",
                                 "lang_encoder.gated_cross_attn_layers.0.attn.to_out.bias", "something.else"])
def test_a_tensor_with_no_place_is_refused_not_dropped(openflamingo, key):
    with pytest.raises(ValueError, match=f"has no place for: \\['{key}'\\]"):
        _convert(openflamingo, lambda s: s.__setitem__(key, torch.ones(32)))


def test_frozen_backbone_copies_of_a_whole_state_checkpoint_are_allowed(openflamingo):
    """The LM's tensors (wrapped layers, OpenFlamingo's duplicate `old_decoder_blocks`), the tower's under its HF
    names or open_clip's, and buffers older transformers saved."""
    _, vision, lm, _ = openflamingo
    width, tower = vision.config.hidden_size, vision.state_dict()
    frozen = {"lang_encoder.model.norm.weight": lm.state_dict()["model.norm.weight"].clone(),
              "lang_encoder.model.layers.0.decoder_layer.mlp.up_proj.weight":
                  lm.state_dict()["model.layers.0.mlp.up_proj.weight"].clone(),
              "lang_encoder.old_decoder_blocks.1.self_attn.q_proj.weight":
                  lm.state_dict()["model.layers.1.self_attn.q_proj.weight"].clone(),
              "lang_encoder.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
              "vision_encoder.tower.post_layernorm.weight": tower["post_layernorm.weight"].clone(),
              "vision_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.ones(3 * width, width),
              "vision_encoder.conv1.weight": tower["embeddings.patch_embedding.weight"].clone()}
    model, _ = _convert(openflamingo, lambda s: s.update(frozen))
    assert torch.equal(model.lm.state_dict()["model.norm.weight"], frozen["lang_encoder.model.norm.weight"])


def open_clip_tower(tower: dict, prefix: str = "vision_encoder.") -> dict:
    """An HF CLIP tower's state in open_clip's ViT layout under `prefix` (`vision_encoder.`: OpenFlamingo 2.x's;
    `vision_encoder.visual.`: v1's whole CLIP, Med-Flamingo's file): q, k and v fused into `in_proj`, and a
    projection `proj` outside the HF tower."""
    tower = {k.removeprefix("vision_model."): v for k, v in tower.items()}  # (transformers 4's tower has the prefix)
    names = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
             "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
             "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
             "ln_post.bias": "post_layernorm.bias"}
    layers = len({k.split(".")[2] for k in tower if k.startswith("encoder.layers.")})
    state = {}
    for i in range(layers):
        for theirs, ours in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                             ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
            names.update({f"transformer.resblocks.{i}.{theirs}.{p}": f"encoder.layers.{i}.{ours}.{p}"
                          for p in ("weight", "bias")})
        for p in ("weight", "bias"):
            state[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(
                [tower[f"encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv"])
    state.update({k: tower[v].clone() for k, v in names.items()})
    state["proj"] = torch.ones(tower["post_layernorm.weight"].shape[0], 8)
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("layout", ["hf", "open_clip"])
def test_a_whole_state_checkpoint_with_another_vision_tower_is_refused(openflamingo, layout):
    """Its frozen tower is compared with the given one as its LM is: another tower of the same shape differs in
    every tensor; in open_clip's layout, a tower of other shapes (another patch size, more positions) too."""
    from flamingo.tiny import tiny_vision

    _, vision, _, _ = openflamingo
    own, other = vision.state_dict(), tiny_vision("clip", seed=7).state_dict()

    def frozen(tower):
        if layout == "open_clip":
            return open_clip_tower(tower)
        return {f"vision_encoder.tower.{k}": v.clone() for k, v in tower.items() if not k.endswith("position_ids")}

    _convert(openflamingo, lambda s: s.update(frozen(own)))  # its own tower: accepted
    with pytest.raises(ValueError, match="the checkpoint holds the frozen vision tower it was trained on, and its "
                                         "tensors differ from the given tower's .*--vision"):
        _convert(openflamingo, lambda s: s.update(frozen(other)))
    if layout == "open_clip":  # 14px patches, 577 positions: open_clip's names say nothing of the shapes
        width = own["embeddings.class_embedding"].shape[0]
        wider = {**frozen(own), "vision_encoder.positional_embedding": torch.zeros(577, width)}
        with pytest.raises(ValueError, match="'vision_encoder.positional_embedding': \\(577, 32\\) there, "
                                             "\\(17, 32\\) in the given tower"):
            _convert(openflamingo, lambda s: s.update(wider))


def test_clip_text_tower_is_skipped_beside_a_v1_tower_only(openflamingo):
    """open_flamingo 0.0.x (v1) saves open_clip's whole CLIP: the tower under `vision_encoder.visual.`, the text
    tower beside it under `vision_encoder.` (frozen, never run). Those names are read as the text tower's only where
    a `visual.` tower is; in 2.x's layout `vision_encoder.` is the tower and CLIP's text tensors have no place."""
    _, vision, _, _ = openflamingo
    text = {"vision_encoder.token_embedding.weight": torch.zeros(64, 16),
            "vision_encoder.positional_embedding": torch.zeros(77, 16),  # the text tower's 77 positions, not the ViT's
            "vision_encoder.transformer.resblocks.5.mlp.c_fc.weight": torch.zeros(64, 16),  # past the ViT's depth
            "vision_encoder.ln_final.weight": torch.ones(16), "vision_encoder.logit_scale": torch.tensor(4.6)}
    v1 = open_clip_tower(vision.state_dict(), "vision_encoder.visual.")
    _convert(openflamingo, lambda s: s.update({**v1, **text}), v1=True)
    with pytest.raises(ValueError, match="no place for: \\['vision_encoder.token_embedding.weight', "
                                         "'vision_encoder.transformer.resblocks.5.mlp.c_fc.weight', "
                                         "'vision_encoder.ln_final.weight', 'vision_encoder.logit_scale'\\]"):
        _convert(openflamingo, lambda s: s.update(text))
    for stray in ("vision_encoder.visual.extra.weight", "vision_encoder.visual_projection.weight"):
        with pytest.raises(ValueError, match=f"no place for: \\['{stray}'\\]"):
            _convert(openflamingo, lambda s: s.update({**v1, **text, stray: torch.ones(16)}), v1=True)


def test_an_embedding_table_of_another_tokenizer_is_refused(openflamingo):
    from flamingo.tiny import tiny_tokenizer

    rows = openflamingo[0]["lang_encoder.model.embed_tokens.weight"].shape[0]
    assert rows == len(openflamingo[3]) + 3  # <|endofchunk|>, <image>, <PAD>
    with pytest.raises(ValueError, match=f"has {rows} rows, the tokenizer 290 tokens \\+ 3 added \\(293 rows\\).*"
                                         "--tokenizer"):
        _convert(openflamingo, tokenizer=tiny_tokenizer(vocab_size=290))


def test_a_tokenizer_with_its_own_pad_takes_the_rows_before_pad(openflamingo):
    """Trained without a pad token (`<PAD>` added last), converted with a tokenizer that has one: 2 added tokens, and
    the table's last row is the unused `<PAD>`."""
    import copy

    state, _, _, tok = openflamingo
    padded = copy.deepcopy(tok)
    padded.pad_token = padded.eos_token
    model, _ = _convert(openflamingo, tokenizer=padded)
    first = len(tok)
    assert (model.config.first_new_token_id, model.config.num_new_tokens) == (first, 2)
    table = state["lang_encoder.model.embed_tokens.weight"]
    assert torch.equal(model.new_token_embeddings.detach(), table[first:first + 2])


@pytest.mark.parametrize("key,shape,words", [
    ("lang_encoder.gated_cross_attn_layers.0.attn.norm.weight", (48,),
     "xattn.0.attn.norm.weight is \\(48,\\) there, \\(32,\\) in the model.*the LM and vision tower"),
    ("lang_encoder.model.embed_tokens.weight", (303, 48), "is \\(303, 48\\), the LM's rows are 32 wide"),
    ("perceiver.layers.0.0.to_q.weight", (7,), "'perceiver.layers.0.0.to_q.weight' is not a matrix"),
])
def test_a_checkpoint_of_other_shapes_is_refused_with_both_shapes(openflamingo, key, shape, words):
    with pytest.raises(ValueError, match=words):
        _convert(openflamingo, lambda s: s.__setitem__(key, torch.zeros(shape)))


def test_a_checkpoint_without_the_lm_input_table_is_refused_by_name(openflamingo):
    """Every OpenFlamingo release saves the table it trained: without it the <image> and <|endofchunk|> rows would
    be untrained, another model on every conversion."""
    with pytest.raises(ValueError, match="lacks 'lang_encoder.model.embed_tokens.weight', the LM's input table"):
        _convert(openflamingo, lambda s: s.pop("lang_encoder.model.embed_tokens.weight"))


def test_missing_size_tensors_and_a_directory_are_named(openflamingo, tmp_path):
    from flamingo.convert import convert_openflamingo

    with pytest.raises(ValueError, match="lacks 'perceiver.layers.0.1.1.weight'"):
        _convert(openflamingo, lambda s: s.pop("perceiver.layers.0.1.1.weight"))
    from flamingo.convert.openflamingo import infer_config

    otter = {"lang_encoder.gated_cross_attn_layers.0.attn.to_q.weight": torch.zeros(4, 4),
             "lang_encoder.model.layers.0.decoder_layer.self_attn.q_proj.weight": torch.zeros(4, 4),
             "perceiver.latents": torch.zeros(2, 4), "perceiver.layers.0.to_q.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="lacks 'perceiver.layers.0.0.to_q.weight' .*`flamingo convert otter`"):
        infer_config(otter)  # an Otter checkpoint in Hugging Face format, given to convert open-flamingo
    with pytest.raises(ValueError, match="is a directory: pass the checkpoint file inside it"):
        convert_openflamingo(str(tmp_path), "vision", "lm")


def test_a_truncated_otter_config_names_its_file(tmp_path):
    from flamingo.convert.otter import otter_config

    (tmp_path / "config.json").write_text('{"model_type": "ott')
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        otter_config(str(tmp_path), "my-otter")
