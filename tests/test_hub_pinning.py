"""Backbones named by their Hub names, read from a hub cache laid out as downloads leave it (offline): a model built
on them records the commit each was read at (`vision_revision`, `lm_revision`), and a trained-only checkpoint loads
them at that commit after the repository's main branch has moved on; a revision given for a backbone (a name, or an
object loaded at it) is resolved to its commit and kept. Also what a Hub name or path that is not a saved Flamingo
gives: refused from its configs before any weights are fetched, a file named as one (a checkpoint.pt with how to
convert it), a snapshot without its weights, remote-code backbones refused without transformers' prompt, and
`flamingo export --revision`."""

from __future__ import annotations

import builtins
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import flamingo.build
from flamingo import Flamingo, from_backbones, load_pretrained
from flamingo.cli import main
from flamingo.convert import write_backbones
from flamingo.model import backbones
from flamingo.model.backbones import load_lm, load_vision_tower
from flamingo.runtime.hub import METADATA
from flamingo.tiny import (
    random_image,
    set_gates,
    tiny_flamingo,
    tiny_flamingo_config,
    tiny_image_processor,
    tiny_lm,
    tiny_tokenizer,
    tiny_vision,
)

from helpers import hub_cache_entry

A, B = "a" * 40, "b" * 40
CLIP, LLAMA = "someone/tiny-clip", "someone/tiny-llama"


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> Path:
    """The repositories' files: a CLIP tower, and two LMs of other weights (seed 0 at main, seed 1 at v1.1)."""
    root = tmp_path_factory.mktemp("snapshots")
    tok = tiny_tokenizer()
    tiny_vision().save_pretrained(root / "clip")
    tiny_image_processor().save_pretrained(root / "clip")
    for seed in (0, 1):
        tiny_lm(vocab_size=len(tok), seed=seed).save_pretrained(root / f"llama{seed}")
        tok.save_pretrained(root / f"llama{seed}")
    return root


@pytest.fixture
def cache(snapshots, tmp_path, monkeypatch) -> Path:
    """A fresh offline hub cache: tiny-clip main -> A; tiny-llama main -> A (seed 0), v1.1 -> B (seed 1)."""
    import huggingface_hub.constants
    import transformers.utils.hub

    cache = tmp_path / "hub"
    hub_cache_entry(cache, CLIP, snapshots / "clip", commit=A)
    hub_cache_entry(cache, LLAMA, snapshots / "llama0", commit=A)
    hub_cache_entry(cache, LLAMA, snapshots / "llama1", revision="v1.1", commit=B)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # transformers 4 copies both at import (5 reads huggingface_hub's at each call)
    for name, value in (("_is_offline_mode", True), ("TRANSFORMERS_CACHE", str(cache))):
        if hasattr(transformers.utils.hub, name):
            monkeypatch.setattr(transformers.utils.hub, name, value)
    return cache


def _move_main(cache: Path, repo: str, commit: str) -> None:
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(commit)


def _logits(model: Flamingo, processor) -> torch.Tensor:
    batch = processor("<image>A photo of", images=[random_image(0)])
    with torch.no_grad():
        return model(**batch).logits


def _edit_config(directory: Path, drop: tuple[str, ...] = (), **changes) -> None:
    path = directory / "flamingo_config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    path.write_text(json.dumps({**config, **changes}))


def test_a_trained_only_checkpoint_loads_its_backbones_at_the_commit_it_was_built_on(cache, tmp_path):
    model, processor = from_backbones(CLIP, LLAMA, config=tiny_flamingo_config())
    set_gates(model, 0.5)
    assert (model.config.vision_revision, model.config.lm_revision) == (A, A)
    model.save_pretrained(str(tmp_path / "m"), trained_only=True, processor=processor)
    saved = json.loads((tmp_path / "m" / "flamingo_config.json").read_text())
    assert (saved["vision_revision"], saved["lm_revision"]) == (A, A)
    assert f"`{LLAMA}` at commit `{A[:12]}`" in (tmp_path / "m" / "README.md").read_text()
    before = _logits(model, processor)

    _move_main(cache, LLAMA, B)  # the LM's repository moves on: other weights at main
    loaded, processor2 = load_pretrained(str(tmp_path / "m"))
    assert torch.allclose(_logits(loaded, processor2), before, atol=1e-6, rtol=0)

    # a config saved before commits were recorded reads main, as before, and records the commit it read
    _edit_config(tmp_path / "m", drop=("vision_revision", "lm_revision"))
    old, _ = load_pretrained(str(tmp_path / "m"))
    assert not torch.allclose(_logits(old, processor2), before, atol=1e-3)
    assert (old.config.vision_revision, old.config.lm_revision) == (A, B)


def test_a_revision_given_for_a_backbone_is_resolved_to_its_commit_and_kept(cache, tmp_path):
    model, processor = from_backbones(CLIP, LLAMA, config=tiny_flamingo_config(), lm_revision="v1.1")
    set_gates(model, 0.5)
    assert model.config.lm_revision == B
    at_v11 = AutoModelForCausalLM.from_pretrained(LLAMA, revision="v1.1")
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.lm.state_dict()[q_proj], at_v11.state_dict()[q_proj])
    model.save_pretrained(str(tmp_path / "m"), trained_only=True, processor=processor)
    loaded, _ = load_pretrained(str(tmp_path / "m"))
    assert torch.allclose(_logits(loaded, processor), _logits(model, processor), atol=1e-6, rtol=0)

    # a `revision` the model's own config carries (a training run's model.flamingo), for these backbones
    configured, _ = from_backbones(CLIP, LLAMA, config=tiny_flamingo_config(lm_revision="v1.1"))
    assert configured.config.lm_revision == B
    # a config copied from a model on other backbones does not carry its commit over
    copied, _ = from_backbones(
        CLIP, str(cache / "models--someone--tiny-llama" / "snapshots" / A), config=configured.config
    )
    assert copied.config.lm_revision is None


def test_backbones_written_to_local_folders_keep_no_hub_commit(cache, tmp_path):
    """`convert.write_backbones` points the config at local copies: the Hub commits recorded for the backbones no
    longer apply (a folder has no revisions) and are cleared, so a trained-only save names the folders alone and
    loads from them."""
    model, processor = from_backbones(CLIP, LLAMA, config=tiny_flamingo_config(), lm_revision="v1.1")
    set_gates(model, 0.5)
    assert (model.config.vision_revision, model.config.lm_revision) == (A, B)
    write_backbones(model, processor, str(tmp_path / "backbones"))
    assert model.config.lm_name_or_path == str(tmp_path / "backbones" / "lm")
    assert (model.config.vision_revision, model.config.lm_revision) == (None, None)
    model.save_pretrained(str(tmp_path / "m"), trained_only=True, processor=processor)
    saved = json.loads((tmp_path / "m" / "flamingo_config.json").read_text())
    assert (saved["vision_revision"], saved["lm_revision"]) == (None, None)
    loaded, _ = load_pretrained(str(tmp_path / "m"))
    assert (loaded.config.vision_revision, loaded.config.lm_revision) == (None, None)
    assert torch.allclose(_logits(loaded, processor), _logits(model, processor), atol=1e-6, rtol=0)


def test_an_object_backbone_is_recorded_at_the_revision_it_was_loaded_at(cache, tmp_path, caplog):
    at_v11 = AutoModelForCausalLM.from_pretrained(LLAMA, revision="v1.1")
    # transformers 5 does not record the commit an object was loaded at: the revision is passed with it
    obj, obj_processor = from_backbones(CLIP, at_v11, config=tiny_flamingo_config(), lm_revision="v1.1")
    set_gates(obj, 0.5)
    assert obj.config.lm_revision == B
    obj.save_pretrained(str(tmp_path / "obj"), trained_only=True, processor=obj_processor)
    loaded, _ = load_pretrained(str(tmp_path / "obj"))
    assert torch.allclose(_logits(loaded, obj_processor), _logits(obj, obj_processor), atol=1e-6, rtol=0)

    # a transformers-4 object names its commit in its config
    vision = load_vision_tower(CLIP)
    vision.config._commit_hash = A
    four, _ = from_backbones(vision, LLAMA, config=tiny_flamingo_config())
    assert four.config.vision_revision == A

    # without one, the commit is unknown: the trained-only save says so (a fresh object: `obj` hooks the first)
    at_v11 = AutoModelForCausalLM.from_pretrained(LLAMA, revision="v1.1")
    if getattr(at_v11.config, "_commit_hash", None):  # transformers 4 recorded it at load: an object that lost it
        at_v11.config._commit_hash = None
    unknown, unknown_processor = from_backbones(CLIP, at_v11, config=tiny_flamingo_config())
    assert unknown.config.lm_revision is None
    with caplog.at_level(logging.WARNING):
        unknown.save_pretrained(str(tmp_path / "unknown"), trained_only=True, processor=unknown_processor)
    assert f"lm_name_or_path '{LLAMA}' without a commit" in caplog.text


def test_a_revision_for_a_backbone_without_revisions_is_refused(cache, snapshots):
    with pytest.raises(
        ValueError, match="lm_revision='v1.1' names a version of a Hub repository, and the LM is the local path"
    ):
        from_backbones(CLIP, str(snapshots / "llama0"), config=tiny_flamingo_config(), lm_revision="v1.1")
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="vision_revision='v1' .* an in-memory model with no name"):
        from_backbones(
            tiny_vision(),
            tiny_lm(vocab_size=len(tok)),
            tok,
            tiny_flamingo_config(),
            image_processor=tiny_image_processor(),
            vision_revision="v1",
        )
    with pytest.raises(ValueError, match="lm_revision must be a Hub commit"):
        tiny_flamingo_config(lm_revision="")


def test_a_hub_repository_that_is_no_flamingo_is_refused_from_its_configs(cache, monkeypatch):
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def recorded(repo_id, **kwargs):
        calls.append(kwargs.get("allow_patterns"))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorded)
    for load in (load_pretrained, Flamingo.from_pretrained):
        calls.clear()
        with pytest.raises(FileNotFoundError, match="not a saved Flamingo model .*an HF 'llama' model"):
            load(LLAMA)
        assert calls == [list(METADATA)]  # the configs alone, never the weights


def test_a_file_or_a_snapshot_without_weights_is_named_as_such(cache, tmp_path, monkeypatch):
    (tmp_path / "checkpoint.pt").write_bytes(b"not read")
    for load in (load_pretrained, Flamingo.from_pretrained):
        with pytest.raises(
            FileNotFoundError, match="is a file, not a directory .*flamingo convert open-flamingo --checkpoint FILE"
            ".*flamingo convert mmgpt --finetune FILE"
        ):
            load(str(tmp_path / "checkpoint.pt"))

    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "full"), processor=processor)
    shutil.copytree(tmp_path / "full", tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    hub_cache_entry(cache, "someone/tiny-flamingo", tmp_path / "configs", commit="c" * 40)
    for load in (load_pretrained, Flamingo.from_pretrained):
        with pytest.raises(
            FileNotFoundError,
            match="no flamingo.safetensors: a Hub snapshot whose weights were not downloaded \\(HF_HUB_OFFLINE",
        ):
            load("someone/tiny-flamingo")
    (tmp_path / "full" / "flamingo.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no flamingo.safetensors: an incomplete copy"):
        Flamingo.from_pretrained(str(tmp_path / "full"))


def test_export_takes_the_revision_of_a_hub_model(monkeypatch, tmp_path):
    seen = []

    def load(name, revision=None, **kwargs):
        seen.append((name, revision))
        raise ValueError("stop here")

    monkeypatch.setattr(flamingo.build, "load_pretrained", load)
    assert (
        main(["export", "open-flamingo", "--model", "org/m", "--revision", "v2", "--out", str(tmp_path / "x.pt")]) == 2
    )
    assert main(["export", "idefics", "--model", "org/m", "--revision", "v3", "--out", str(tmp_path / "i")]) == 2
    assert seen == [("org/m", "v2"), ("org/m", "v3")]


def _remote_code(directory: Path, model_type: str) -> Path:
    """An LM directory whose config names the repository's own classes (`auto_map`)."""
    tok = tiny_tokenizer()
    tiny_lm(vocab_size=len(tok)).save_pretrained(directory)
    tok.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type=model_type,
        auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"},
    )
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_remote_code_backbones_are_refused_without_a_prompt(tmp_path, monkeypatch):
    def no_prompt(*args):
        raise AssertionError("transformers asked whether to run remote code")

    monkeypatch.setattr(builtins, "input", no_prompt)
    remote = _remote_code(tmp_path / "remote", "xlm_of_its_own")
    with pytest.raises(
        ValueError,
        match="needs remote code: transformers has no class to load it with \\(model_type 'xlm_of_its_own'\\)",
    ):
        load_lm(str(remote))
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="needs remote code"):
        from_backbones(
            tiny_vision(), str(remote), config=tiny_flamingo_config(), image_processor=tiny_image_processor()
        )
    tower = tiny_vision()
    tower.save_pretrained(tmp_path / "tower")
    config = json.loads((tmp_path / "tower" / "config.json").read_text())
    config.update(model_type="tower_of_its_own", auto_map={"AutoConfig": "c.C", "AutoModel": "m.M"})
    (tmp_path / "tower" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the vision tower .* needs remote code"):
        load_vision_tower(str(tmp_path / "tower"))

    # an in-memory model loaded with trust_remote_code: a model built on it could never load back
    lm = tiny_lm(vocab_size=len(tok))
    lm.config.model_type, lm.config.auto_map = "xlm_of_its_own", {"AutoModelForCausalLM": "modeling_x.X"}
    with pytest.raises(ValueError, match="the LM 'in-memory LlamaForCausalLM' needs remote code"):
        from_backbones(tiny_vision(), lm, tok, tiny_flamingo_config(), image_processor=tiny_image_processor())

    # a model type transformers ships, with the repository's code beside it (MPT-7B's): transformers' class, no prompt
    native = _remote_code(tmp_path / "native", "llama")
    seen = {}
    load = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(backbones.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    assert type(load_lm(str(native))).__name__ == "LlamaForCausalLM"
    assert seen["trust_remote_code"] is False


def test_a_resumed_training_run_reads_its_backbones_at_the_commits_it_started_on(cache, world, tmp_path):
    """A run on Hub-name backbones records their commits in its checkpoints; resumed after the LM's repository moved
    on, it rebuilds on the commits it trained on (not the new main), and its final model records them."""
    from flamingo.train.config import load_config
    from flamingo.train.trainer import Trainer

    from train_fixtures import train_config

    _, _, _, data = world
    path = train_config(str(tmp_path), CLIP, LLAMA, data, steps=2, out=str(tmp_path / "run"), interleaved=False)
    trainer = Trainer(load_config(path))
    assert (trainer.model.config.vision_revision, trainer.model.config.lm_revision) == (A, A)
    trainer.train_step()
    trainer.save()
    _move_main(cache, LLAMA, B)
    resumed = Trainer(load_config(path))
    assert resumed.step == 1 and resumed.model.config.lm_revision == A
    assert (resumed.model.config.vision_revision, resumed.model.config.lm_revision) == (A, A)


def test_a_resumed_run_keeps_its_commits_over_a_branch_its_config_names(cache, world, tmp_path):
    """model.flamingo.lm_revision: main is read at its commit when the run starts; resumed after main moved, the run
    keeps training on that commit (the branch is not looked up again)."""
    from flamingo.train.config import load_config
    from flamingo.train.trainer import Trainer

    from train_fixtures import train_config

    _, _, _, data = world
    path = train_config(str(tmp_path), CLIP, LLAMA, data, steps=2, out=str(tmp_path / "run"), interleaved=False)
    trainer = Trainer(load_config(path, ["model.flamingo.lm_revision=main"]))
    assert trainer.model.config.lm_revision == A
    trainer.train_step()
    trainer.save()
    _move_main(cache, LLAMA, B)
    resumed = Trainer(load_config(path, ["model.flamingo.lm_revision=main"]))
    assert resumed.step == 1 and resumed.model.config.lm_revision == A
