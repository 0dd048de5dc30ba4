"""Our model -> OpenFlamingo's `checkpoint.pt` (flamingo/convert/to_openflamingo.py): OpenFlamingo's own modules,
built as its factory builds them on the same backbones and loading the file as its README says (plus the recipe's
additions), give our logits; converting the file back gives our model again; what OpenFlamingo cannot compute is
refused with the reasons."""

import copy
import json

import pytest
import torch

pytestmark = pytest.mark.peer
pytest.importorskip("einops_exts", reason="the OpenFlamingo peer needs einops-exts")
from flamingo.cli import main  # noqa: E402
from flamingo.convert import convert_openflamingo  # noqa: E402
from flamingo.convert.to_openflamingo import (  # noqa: E402
    incompatibilities,
    openflamingo_state,
    save_openflamingo_checkpoint,
)
from flamingo.peers.openflamingo import build_openflamingo  # noqa: E402
from flamingo.runtime.compat import TRANSFORMERS  # noqa: E402
from flamingo.tiny import random_image, tiny_flamingo, tiny_tokenizer  # noqa: E402

from helpers import unhooked_copy  # noqa: E402

# the sizes OpenFlamingo's factory builds (64 latents, 6 resampler layers, 8 heads of 64; xattn 8 heads of 64)
FACTORY = dict(num_latents=64, resampler_depth=6, resampler_heads=8, resampler_head_dim=64, xattn_heads=8,
               xattn_head_dim=64, ffw_mult=4, xattn_every=2)
PROMPTS = ["Intro <image>Question: what? Short answer: red.<|endofchunk|><image>Question: and?",
           "<image>A photo of a cat.<|endofchunk|>"]


def _ours(lm: str):
    """A model of ours as training leaves it: gates, time embeddings and added rows (and an untied head's, its bias
    too) all non-zero and unlike their initial values; a head bias (Phi's) non-zero in the LM's rows too, as a real
    Phi's is."""
    return _trained(*tiny_flamingo(lm, gates=0.4, **FACTORY))


def _trained(model, processor):
    """`model` with its trained tensors set as `_ours` says."""
    torch.manual_seed(3)
    with torch.no_grad():
        for block in model.xattn:  # every gate its own value
            block.attn_gate.uniform_(0.2, 1.0)
            block.ffw_gate.uniform_(-1.0, -0.2)
        model.resampler.time_embeddings.normal_(0, 0.5)
        model.new_token_embeddings.normal_(0, 0.5)
        if model.new_lm_head is not None:
            model.new_lm_head.normal_(0, 0.5)
        if model.new_lm_head_bias is not None:
            model.lm.get_output_embeddings().bias.normal_(0, 1.0)
            model.new_lm_head_bias.normal_(0, 1.0)
    return model, processor


def _batch(processor):
    """Stills only: OpenFlamingo 2.0.1 runs one frame per medium (it adds frame_embs[0], as we add the first time
    embedding)."""
    return processor(PROMPTS, images=[[random_image(0), random_image(1)], [random_image(2)]], padding_side="right")


# untied head (its added rows exported), tied head, untied head with a bias (its added rows exported too)
@pytest.mark.parametrize("lm", ["llama", "mosaic_gpt", "phi"])
def test_openflamingo_loads_the_export_and_computes_our_logits(lm, tmp_path):
    model, processor = _ours(lm)
    model.save_pretrained(str(tmp_path / "ours"), processor=processor)
    out = tmp_path / "checkpoint.pt"
    assert main(["export", "open-flamingo", "--model", str(tmp_path / "ours"), "--out", str(out)]) == 0
    recipe = json.loads((tmp_path / "checkpoint.pt.json").read_text())
    assert recipe["create_model_and_transforms"]["cross_attn_every_n_layers"] == 2

    peer, _ = build_openflamingo(copy.deepcopy(model.vision), copy.deepcopy(model.lm).eval(), tiny_tokenizer(),
                                 cross_attn_every_n_layers=2)
    for line in recipe.get("before_load", []):  # the additions OpenFlamingo's factory does not make
        exec(line, {"torch": torch, "model": peer})
    state = torch.load(out, weights_only=True)
    result = peer.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    trained = [k for k, p in peer.named_parameters() if k.startswith(("perceiver.", "lang_encoder.gated_cross"))]
    assert trained and not set(trained) & set(result.missing_keys)

    batch = _batch(processor)
    with torch.no_grad():
        mine = model(**batch).logits
        theirs = peer.eval()(vision_x=batch["images"], lang_x=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert mine.shape == theirs.shape
    assert (mine[real] - theirs[real]).abs().max() <= 1e-5

    back, back_processor = convert_openflamingo(state, copy.deepcopy(model.vision), unhooked_copy(model.lm),
                                                tiny_tokenizer(), image_processor=processor.image_processor)
    with torch.no_grad():
        again = back(**_batch(back_processor)).logits
    assert (again[real] - mine[real]).abs().max() <= 1e-5


def test_the_recipe_names_the_commits_the_backbones_are_pinned_to(tmp_path):
    """OpenFlamingo's factory takes the backbones' names and reads their newest versions: the recipe gives the commits
    the model's config records (`vision_revision`, `lm_revision`), so that following it after the LM's repository
    has moved on builds OpenFlamingo on the weights the model was trained with."""
    model, processor = _ours("llama")
    model.config.vision_name_or_path, model.config.vision_revision = "someone/tiny-clip", "a" * 40
    model.config.lm_name_or_path, model.config.lm_revision = "someone/tiny-llama", "b" * 40
    model.save_pretrained(str(tmp_path / "ours"), processor=processor)  # full: the backbones load from it
    out = tmp_path / "checkpoint.pt"
    assert main(["export", "open-flamingo", "--model", str(tmp_path / "ours"), "--out", str(out)]) == 0
    recipe = json.loads((tmp_path / "checkpoint.pt.json").read_text())
    assert recipe["create_model_and_transforms"]["lang_encoder_path"] == "someone/tiny-llama"
    assert recipe["revisions"] == {"someone/tiny-llama": "b" * 40, "someone/tiny-clip": "a" * 40}
    assert "snapshot_download" in recipe["revisions_note"]


def test_what_openflamingo_cannot_compute_is_refused(tmp_path, capsys):
    model, processor = tiny_flamingo("llama", block="idefics", xattn_ffw_dim=64, only_attend_last_image=False,
                                     num_image_references=2)
    reasons = incompatibilities(model)
    for words in ("'idefics' cross-attention blocks", "every earlier image", "image reference", "factory builds"):
        assert any(words in r for r in reasons), (words, reasons)
    with pytest.raises(ValueError, match="OpenFlamingo cannot represent this model"):
        openflamingo_state(model)
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    assert main(["export", "open-flamingo", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "c.pt")]) == 2
    assert "OpenFlamingo cannot represent this model" in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()

    exportable, _ = _ours("llama")
    assert incompatibilities(exportable) == []


def test_blocks_skipped_on_imageless_rows_are_refused():
    """OpenFlamingo runs the blocks on every row (its attention term zero without an image, the gated FFW still
    added): a model that skips them on rows without images computes another function there."""
    model, _ = tiny_flamingo("llama", imageless_rows_skip_blocks=True, **FACTORY)
    assert incompatibilities(model) == ["blocks skipped on rows without images (imageless_rows_skip_blocks; "
                                        "OpenFlamingo runs them on every row)"]


def test_added_tokens_other_than_openflamingos_are_refused(tmp_path):
    """OpenFlamingo's factory adds `<|endofchunk|>`, `<image>` and `<PAD>` (none when the tokenizer has a pad token),
    and builds its table with exactly those rows: a model with a family's marker too (Otter's `<answer>`, between
    `<image>` and `<PAD>`) has a table OpenFlamingo cannot load, and another `<PAD>` id."""
    from flamingo.build import from_backbones
    from flamingo.tiny import tiny_flamingo_config, tiny_image_processor, tiny_lm, tiny_vision

    tok = tiny_tokenizer()
    model, processor = from_backbones(tiny_vision(), tiny_lm(vocab_size=len(tok)), tok, tiny_flamingo_config(**FACTORY),
                                      image_processor=tiny_image_processor(), extra_tokens=("<answer>",))
    answer = processor.tokenizer.convert_tokens_to_ids("<answer>")
    reasons = incompatibilities(model)
    assert len(reasons) == 1 and f"id {answer}" in reasons[0] and "<answer>" in reasons[0], reasons
    with pytest.raises(ValueError, match="OpenFlamingo cannot represent this model: added tokens"):
        openflamingo_state(model)
    # with the processor, the row OpenFlamingo lacks is named by its text as well as its id
    assert f"added tokens [<|endofchunk|>, <image>, <answer> (id {answer}), the pad token]" in \
        incompatibilities(model, processor)[0]
    with pytest.raises(ValueError, match=f"<answer> \\(id {answer}\\), the pad token"):
        save_openflamingo_checkpoint(model, str(tmp_path / "x.pt"), processor)

    padded = tiny_tokenizer()  # a tokenizer with a pad token of its own: OpenFlamingo adds two tokens
    padded.add_special_tokens({"pad_token": "<pad>"})
    model, _ = from_backbones(tiny_vision(), tiny_lm(vocab_size=len(padded)), padded, tiny_flamingo_config(**FACTORY),
                              image_processor=tiny_image_processor())
    assert model.config.num_new_tokens == 2 and incompatibilities(model) == []


def test_export_overwrites_only_an_earlier_export(tmp_path, capsys, monkeypatch):
    """`--out` is a file: a directory, an existing file that is no earlier export (the source's own weights, a
    user's file) and a path inside the source are refused before the model loads; a missing parent is created; an
    earlier export is replaced, its recipe with it, and a failed export leaves the earlier pair as it was."""
    from flamingo.build import load_pretrained
    from flamingo.convert import to_openflamingo

    model, processor = _ours("llama")
    model.save_pretrained(str(tmp_path / "ours"), processor=processor)
    command = ["export", "open-flamingo", "--model", str(tmp_path / "ours"), "--out"]
    assert main([*command, str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert main([*command, str(notes)]) == 2
    assert "is not an earlier OpenFlamingo export" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not an earlier OpenFlamingo export"):
        to_openflamingo.save_openflamingo_checkpoint(model, str(notes))
    assert notes.read_text() == "keep me" and not (tmp_path / "notes.txt.json").exists()
    weights = tmp_path / "ours" / "flamingo.safetensors"
    saved = weights.read_bytes()
    assert main([*command, str(weights)]) == 2
    assert main([*command, str(tmp_path / "ours" / "checkpoint.pt")]) == 2
    assert weights.read_bytes() == saved and not (tmp_path / "ours" / "checkpoint.pt").exists()
    load_pretrained(str(tmp_path / "ours"))

    published = tmp_path / "published" / "checkpoint.pt"  # OpenFlamingo's own file (a download): no recipe beside it
    published.parent.mkdir()
    torch.save(openflamingo_state(model), published)
    original = published.read_bytes()
    assert main([*command, str(published)]) == 2
    assert "is not an earlier OpenFlamingo export" in capsys.readouterr().err
    assert published.read_bytes() == original and not (tmp_path / "published" / "checkpoint.pt.json").exists()
    (tmp_path / "published" / "checkpoint.pt.json").write_text(json.dumps({"create_model_and_transforms": {}}))
    assert main([*command, str(published)]) == 2  # a recipe not written by the export does not make it one
    assert published.read_bytes() == original

    out = tmp_path / "new" / "checkpoint.pt"  # its parent is created
    assert main([*command, str(out)]) == 0
    assert main([*command, str(out)]) == 0  # over the earlier export
    first = out.read_bytes(), (tmp_path / "new" / "checkpoint.pt.json").read_bytes()

    with torch.no_grad():
        model.resampler.latents.add_(1.0)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(to_openflamingo.json, "dump", fail)  # the recipe cannot be written
    with pytest.raises(OSError, match="disk full"):
        to_openflamingo.save_openflamingo_checkpoint(model, str(out))
    assert (out.read_bytes(), (tmp_path / "new" / "checkpoint.pt.json").read_bytes()) == first
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["checkpoint.pt", "checkpoint.pt.json"]


def _openflamingo_factory(vision, monkeypatch):
    """OpenFlamingo 2.0.1's own `create_model_and_transforms` (its factory.py, loaded beside the peer's modules),
    with open_clip (not installed: it pulls torchvision) a stub that serves the HF tower `vision` under any name."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    from flamingo.peers.openflamingo import _PACKAGE, HFVisualForOpenFlamingo, load_openflamingo_modules

    load_openflamingo_modules()
    stub = types.ModuleType("open_clip")
    stub.create_model_and_transforms = lambda name, pretrained=None: (
        types.SimpleNamespace(visual=HFVisualForOpenFlamingo(vision)), None, None)
    stub.get_model_config = lambda name: {"vision_cfg": {"width": vision.config.hidden_size}}
    monkeypatch.setitem(sys.modules, "open_clip", stub)
    spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.factory",
                                                  Path(sys.modules[_PACKAGE].__path__[0]) / "factory.py")
    factory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(factory)
    return factory.create_model_and_transforms


# OpenFlamingo's FlamingoLayer wraps each decoder layer; transformers 4's Qwen2Model reads `attention_type` off its
# layers, which the wrapper does not pass on: OpenFlamingo 2.0.1 cannot run a Qwen2 LM there, whatever the recipe
QWEN2_IN_OPENFLAMINGO = pytest.mark.skipif(TRANSFORMERS < (5, 0), reason="OpenFlamingo 2.0.1's FlamingoLayer hides "
                                           "Qwen2's attention_type from transformers 4's Qwen2Model")


@pytest.mark.parametrize("lm", ["phi", pytest.param("qwen2", marks=QWEN2_IN_OPENFLAMINGO)])
def test_the_recipe_followed_as_written_builds_openflamingo(lm, tmp_path, monkeypatch):
    """The recipe's `create_model_and_transforms` arguments, passed as written to OpenFlamingo 2.0.1's own factory
    (the LM and tokenizer from the directory the model was built on; the vision tower served for its open_clip
    names), build the model that loads the export and computes our logits, for LMs whose decoder layers the factory
    cannot infer from the class name (it knows OPT, GPT-J, Pythia, LLaMA, GPT-NeoX and MPT): the recipe names them."""
    from flamingo.build import from_backbones
    from flamingo.tiny import tiny_flamingo_config, tiny_image_processor, tiny_lm, tiny_vision

    lm_dir = tmp_path / "lm"
    tiny_lm(lm).save_pretrained(str(lm_dir))
    tiny_tokenizer().save_pretrained(str(lm_dir))  # read back as the LM's class reads it (Qwen2's adds a pad token)
    model, processor = _trained(*from_backbones(tiny_vision(), str(lm_dir), config=tiny_flamingo_config(**FACTORY),
                                                image_processor=tiny_image_processor()))
    out = tmp_path / "checkpoint.pt"
    recipe = save_openflamingo_checkpoint(model, str(out), processor)
    arguments = recipe["create_model_and_transforms"]
    assert arguments["tokenizer_path"] == str(lm_dir) and arguments["decoder_layers_attr_name"] == "model.layers"

    peer, _, tokenizer = _openflamingo_factory(copy.deepcopy(model.vision), monkeypatch)(**arguments)
    for line in recipe.get("before_load", []):
        exec(line, {"torch": torch, "model": peer})
    result = peer.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert not result.unexpected_keys
    batch = _batch(processor)
    assert tokenizer(PROMPTS[0]).input_ids == processor.tokenizer(PROMPTS[0]).input_ids
    with torch.no_grad():
        mine = model(**batch).logits
        theirs = peer.eval()(vision_x=batch["images"], lang_x=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert (mine[real] - theirs[real]).abs().max() <= 1e-5


def test_the_recipe_names_no_tokenizer_other_than_the_one_converted_with(tmp_path, monkeypatch):
    """A model converted with a tokenizer other than its LM directory's (`--tokenizer`; here the LM's has a pad
    token, the given one none, so the model's table has `<PAD>` too): the recipe does not name the LM's tokenizer,
    on which OpenFlamingo's factory builds a table of another size, but says which one to use and why; that one
    gives the factory the export's table."""
    from flamingo.build import from_backbones
    from flamingo.tiny import tiny_flamingo_config, tiny_image_processor, tiny_lm, tiny_vision

    lm_dir, converted = tmp_path / "lm_pad", tmp_path / "tokenizer"
    padded = tiny_tokenizer()
    padded.pad_token = padded.eos_token
    tiny_lm("llama", vocab_size=len(padded)).save_pretrained(str(lm_dir))
    padded.save_pretrained(str(lm_dir))
    tiny_tokenizer().save_pretrained(str(converted))
    model, processor = from_backbones(tiny_vision(), str(lm_dir), tiny_tokenizer(), tiny_flamingo_config(**FACTORY),
                                      image_processor=tiny_image_processor())
    assert model.config.num_new_tokens == 3  # <|endofchunk|>, <image>, <PAD>
    recipe = save_openflamingo_checkpoint(model, str(tmp_path / "checkpoint.pt"), processor)
    arguments = recipe["create_model_and_transforms"]
    assert arguments["lang_encoder_path"] == str(lm_dir)
    assert arguments["tokenizer_path"].startswith("<the tokenizer this model was converted with")
    assert "--tokenizer" in arguments["tokenizer_path"] and "300 tokens and pad token id" in arguments["tokenizer_path"]
    table = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["lang_encoder.model.embed_tokens.weight"]

    build = _openflamingo_factory(copy.deepcopy(model.vision), monkeypatch)
    rows = {}
    for name, tokenizer_path in (("lm", str(lm_dir)), ("converted", str(converted))):
        peer, _, _ = build(**{**arguments, "tokenizer_path": tokenizer_path})
        rows[name] = peer.lang_encoder.get_input_embeddings().num_embeddings
    assert rows == {"lm": table.shape[0] - 1, "converted": table.shape[0]}


def test_an_lm_tokenizer_that_cannot_be_read_leaves_the_recipe_naming_the_lm(tmp_path, monkeypatch):
    """`lm_tokenizer_problem` reads the LM's tokenizer only to check it: one no tokenizer class reads (any error the
    loader raises) is no reason to refuse or fail the export; the recipe names the LM, as before the check."""
    import flamingo.convert.to_openflamingo as export
    from flamingo.build import from_backbones
    from flamingo.tiny import tiny_flamingo_config, tiny_image_processor, tiny_lm, tiny_vision

    lm_dir = tmp_path / "lm"
    tiny_lm("llama").save_pretrained(str(lm_dir))
    tiny_tokenizer().save_pretrained(str(lm_dir))
    model, processor = from_backbones(tiny_vision(), str(lm_dir), config=tiny_flamingo_config(**FACTORY),
                                      image_processor=tiny_image_processor())

    def unreadable(source):
        raise Exception("data did not match any variant of untagged enum ModelWrapper")  # tokenizers' own

    monkeypatch.setattr(export, "load_tokenizer", unreadable)
    recipe = save_openflamingo_checkpoint(model, str(tmp_path / "checkpoint.pt"), processor)
    assert recipe["create_model_and_transforms"]["tokenizer_path"] == str(lm_dir)
