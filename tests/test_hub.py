"""Sharing on the Hugging Face Hub: a model pushed (`push_to_hub`, `flamingo push`) is what
`load_pretrained("org/name")` reads back from the hub cache (offline, in a fresh process) with the same logits, at a
branch too; a trained-only push names its backbones, which load by their own hub names; the card is the Hub's format
with the right metadata; names that are neither a directory nor a reachable repository get a clear error.

The Hub itself is out of reach here: `HfApi` is replaced by a small in-memory hub that applies the commit
operations our code builds, and what it holds is laid out as a download leaves it in the hub cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from flamingo import load_pretrained, push_to_hub
from flamingo.cli import main
from flamingo.hub import push_directory
from flamingo.tiny import random_image, tiny_flamingo, tiny_image_processor, tiny_lm, tiny_tokenizer, tiny_vision

from helpers import hub_cache_entry

PROMPT = "<image>A photo of a cat.<|endofchunk|><image>two"


class FakeHub:
    """The part of `huggingface_hub.HfApi` a push uses, over an in-memory store {repo: {branch: {path: bytes}}}."""

    repos: dict[str, dict[str, dict[str, bytes]]] = {}
    commits: list[tuple[str, str, list[str]]] = []
    logged_in = True

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, **_):
        if not (self.logged_in or self.token):
            from huggingface_hub.errors import LocalTokenNotFoundError

            raise LocalTokenNotFoundError("Token is required (write-access action) but no token found.")
        if repo_id in self.repos and not exist_ok:
            raise RuntimeError("exists")
        self.repos.setdefault(repo_id, {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}})

    def create_branch(self, repo_id, branch, exist_ok=False, **_):
        self.repos[repo_id].setdefault(branch, dict(self.repos[repo_id]["main"]))

    def list_repo_files(self, repo_id, revision=None, **_):
        return sorted(self.repos[repo_id][revision or "main"])

    def create_commit(self, repo_id, operations, commit_message, revision=None, **_):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        files = self.repos[repo_id][revision or "main"]
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                source = op.path_or_fileobj
                files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
            else:
                assert isinstance(op, CommitOperationDelete)
                del files[op.path_in_repo]
        self.commits.append((repo_id, commit_message, [op.path_in_repo for op in operations]))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/{len(self.commits):040x}"
        return Info()

    @classmethod
    def to_cache(cls, repo_id: str, cache: Path, scratch: Path, branch: str = "main", commit: str = "1" * 40):
        """The repository's branch as a download leaves it in the hub cache."""
        folder = scratch / f"{repo_id.replace('/', '--')}-{branch}"
        for path, data in cls.repos[repo_id][branch].items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        hub_cache_entry(cache, repo_id, folder, revision=branch, commit=commit)


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeHub.repos, FakeHub.commits, FakeHub.logged_in = {}, [], True
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def _gated_model(seed: int = 0, gates: float = 0.5, **kwargs):
    return tiny_flamingo(gates=gates, seed=seed, **kwargs)


def _logits(model, processor) -> torch.Tensor:
    batch = processor(PROMPT, images=[random_image(0), random_image(1)])
    with torch.no_grad():
        return model(**batch).logits


def _load_offline(tmp_path: Path, cache: Path, calls: list[dict]) -> list:
    """Run `load_pretrained(name, revision=)` per call in a fresh process with only the hub cache (no network);
    each returns its logits on PROMPT (or its error)."""
    out = tmp_path / "offline.json"
    code = f"""
import json, torch
from flamingo import load_pretrained
from flamingo.tiny import random_image
results = []
for call in {calls!r}:
    try:
        model, processor = load_pretrained(call["name"], revision=call.get("revision"))
    except FileNotFoundError as e:
        results.append({{"error": str(e)}})
        continue
    batch = processor({PROMPT!r}, images=[random_image(0), random_image(1)])
    with torch.no_grad():
        results.append({{"logits": model(**batch).logits.tolist()}})
json.dump(results, open({str(out)!r}, "w"))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [r if "error" in r else torch.tensor(r["logits"]) for r in json.loads(out.read_text())]


def test_a_pushed_model_loads_by_its_hub_name_with_the_same_logits_at_each_branch(tmp_path, hub):
    model, processor = _gated_model(seed=0)
    other, _ = _gated_model(seed=1, gates=-0.7)
    url = push_to_hub(model, "someone/tiny-flamingo", processor=processor)
    assert url.startswith("https://huggingface.co/someone/tiny-flamingo/commit/")
    push_to_hub(other, "someone/tiny-flamingo", processor=processor, revision="v2", commit_message="gates -0.7")
    files = hub.repos["someone/tiny-flamingo"]["main"]
    assert {"flamingo.safetensors", "flamingo_config.json", "flamingo_processor.json", "README.md",
            "lm/config.json", "vision/config.json"} <= set(files)
    assert hub.commits[-1][1] == "gates -0.7" and "someone/tiny-flamingo" in hub.repos

    cache = tmp_path / "hf" / "hub"
    hub.to_cache("someone/tiny-flamingo", cache, tmp_path / "scratch")
    hub.to_cache("someone/tiny-flamingo", cache, tmp_path / "scratch", branch="v2", commit="2" * 40)
    main_logits, v2_logits, absent, path = _load_offline(tmp_path, cache, [
        {"name": "someone/tiny-flamingo"}, {"name": "someone/tiny-flamingo", "revision": "v2"},
        {"name": "nobody/absent-flamingo"}, {"name": str(tmp_path / "no" / "such" / "dir")}])
    assert torch.allclose(main_logits, _logits(model, processor), atol=1e-5, rtol=0)
    assert torch.allclose(v2_logits, _logits(other, processor), atol=1e-5, rtol=0)
    assert not torch.allclose(main_logits, v2_logits, atol=1e-3)
    assert "nobody/absent-flamingo" in absent["error"] and "could not be read" in absent["error"]
    assert "directory not found" in path["error"]

    # the command line loads the branch it names
    random_image(0).save(tmp_path / "a.png")
    prompt = "<image>Question: what? Answer:"
    argv = ["generate", "--model", "someone/tiny-flamingo", "--revision", "v2", "--prompt", prompt,
            "--image", str(tmp_path / "a.png"), "--max-new-tokens", "4"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    code = f"from flamingo.cli import main; raise SystemExit(main({argv!r}))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    batch = processor(prompt, images=[str(tmp_path / "a.png")])
    greedy = other.generate(**batch, max_new_tokens=4)[0, batch["input_ids"].shape[1]:]
    assert run.stdout.strip() == processor.decode(greedy).strip()
    assert not torch.equal(model.generate(**batch, max_new_tokens=4)[0, batch["input_ids"].shape[1]:], greedy)


def test_a_trained_only_push_loads_its_backbones_by_their_hub_names_and_drops_stale_ones(tmp_path, hub):
    model, processor = _gated_model(seed=0)
    push_to_hub(model, "someone/tiny-flamingo", processor=processor)  # full, with vision/ and lm/
    cache = tmp_path / "hf" / "hub"
    for name, backbone in (("someone/tiny-clip", model.vision), ("someone/tiny-llama", model.lm)):
        backbone.save_pretrained(tmp_path / name)
        hub_cache_entry(cache, name, tmp_path / name)
    tiny_image_processor("clip").save_pretrained(tmp_path / "someone/tiny-clip")
    model.config.vision_name_or_path, model.config.lm_name_or_path = "someone/tiny-clip", "someone/tiny-llama"
    push_to_hub(model, "someone/tiny-flamingo", processor=processor, trained_only=True)

    files = hub.repos["someone/tiny-flamingo"]["main"]
    assert not any(p.startswith(("vision/", "lm/")) for p in files), sorted(files)  # removed in the same commit
    card = ModelCard(files["README.md"].decode())
    assert "trained tensors only" not in card.text  # a card already there is kept: the full push's
    push_to_hub(model, "someone/tiny-flamingo", processor=processor, trained_only=True, replace_card=True)
    card = ModelCard(hub.repos["someone/tiny-flamingo"]["main"]["README.md"].decode())
    assert "trained tensors only" in card.text
    assert card.data.base_model == ["someone/tiny-clip", "someone/tiny-llama"]

    hub.to_cache("someone/tiny-flamingo", cache, tmp_path / "scratch")
    (logits,) = _load_offline(tmp_path, cache, [{"name": "someone/tiny-flamingo"}])
    assert torch.allclose(logits, _logits(model, processor), atol=1e-5, rtol=0)


def test_the_card_has_the_hubs_metadata_and_counts_what_trained(tmp_path):
    model, processor = _gated_model()
    model.save_pretrained(str(tmp_path / "my-flamingo"), processor=processor)
    card = ModelCard((tmp_path / "my-flamingo" / "README.md").read_text())
    assert card.data.library_name == "flamingo" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.base_model is None  # built from objects: no hub names to link
    trained = sum(p.numel() for p in model.trainable_parameters().values())
    assert f"| parameters stored beside the backbones | {trained:,}:" in card.text
    layers = ", ".join(map(str, model.xattn_layer_indices))
    assert f"before {len(model.xattn_layer_indices)} of the LM's {model.lm.config.num_hidden_layers} layers " \
           f"({layers})" in card.text
    assert 'load_pretrained("my-flamingo")' in card.text and "full: the backbones are in" in card.text

    vision, tokenizer = tiny_vision("clip"), tiny_tokenizer()
    lm = tiny_lm("llama", vocab_size=len(tokenizer))
    vision.save_pretrained(tmp_path / "v")
    lm.save_pretrained(tmp_path / "l")
    from flamingo import FlamingoConfig, from_backbones

    model, _ = from_backbones(str(tmp_path / "v"), str(tmp_path / "l"), tokenizer,
                              FlamingoConfig(num_latents=4, resampler_depth=1, xattn_every=2, num_image_references=3),
                              image_processor=tiny_image_processor("clip"))
    model.save_pretrained(str(tmp_path / "refs"), trained_only=True)  # local paths, no processor
    card = ModelCard((tmp_path / "refs" / "README.md").read_text())
    assert card.data.base_model is None  # local paths are not hub names
    assert "trained tensors only" in card.text and "`<image0>` ... `<image2>`" in card.text
    assert "every 2nd layer" in card.text and "Flamingo.from_pretrained(" in card.text
    assert "| each text token sees | the last image or image reference before it |" in card.text  # the rule, extended


def test_push_command_and_clear_errors(tmp_path, hub, capsys):
    model, processor = _gated_model()
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    card = tmp_path / "m" / "README.md"
    assert main(["push", "--model", str(tmp_path / "m"), "--repo", "someone/m"]) == 0
    assert "someone/m" in capsys.readouterr().out
    pushed = hub.repos["someone/m"]["main"]
    assert 'load_pretrained("someone/m")' in pushed["README.md"].decode()  # renamed for the repository
    assert pushed["flamingo.safetensors"] == (tmp_path / "m" / "flamingo.safetensors").read_bytes()

    card.write_text(card.read_text() + "\nTrained on my photos.\n")  # edited by hand: pushed as it is
    push_directory(str(tmp_path / "m"), "someone/m", replace_card=True)
    assert hub.repos["someone/m"]["main"]["README.md"].decode() == card.read_text()

    assert main(["push", "--model", str(tmp_path / "m"), "--repo", "not a repo"]) == 2
    assert main(["push", "--model", str(tmp_path), "--repo", "someone/m"]) == 2
    err = capsys.readouterr().err
    assert "not a Hub repository name" in err and "not a directory written by save_pretrained" in err
    assert len(hub.commits) == 2  # nothing pushed by the refusals
    (tmp_path / "my-llama").mkdir()  # a local backbone: saved trained-only here, nobody else could load it
    with pytest.raises(ValueError, match="lm backbone is the local path"):
        model.config.vision_name_or_path, model.config.lm_name_or_path = "someone/clip", str(tmp_path / "my-llama")
        push_to_hub(model, "someone/m", processor=processor, trained_only=True)
    results = tmp_path / "eval"  # what `flamingo eval --out` leaves
    results.mkdir()
    table = "| metric | 0-shot |\n|---|---|\n| vqa_accuracy | 41.00 ± 0.50 |\n"
    (results / "results.md").write_text("# vqa — m\n\n" + table)
    rows = [{"shots": 0, "metric": "vqa_accuracy", "mean": 41.0, "std": 0.5},
            {"shots": 0, "metric": "vqa_accuracy/yes/no", "mean": 60.0, "std": 1.0},  # a breakdown: table only
            {"shots": 4, "metric": "vqa_accuracy", "mean": 44.256, "std": 0.1}]
    (results / "results.json").write_text(json.dumps({"task": "vqa", "data": "/data/vqav2/", "summary": rows}))
    assert main(["push", "--model", str(tmp_path / "m"), "--repo", "someone/m", "--results", str(results)]) == 0
    card = ModelCard(hub.repos["someone/m"]["main"]["README.md"].decode())
    assert "## Evaluation" in card.text and "### vqa on vqav2\n\n" + table in card.text
    assert card.data.library_name == "flamingo"  # the card's own metadata kept beside the results
    (index,) = card.data.to_dict()["model-index"]  # the Hub's evaluation results
    assert index["name"] == "m"
    assert [(r["task"]["type"], r["dataset"]["name"], [(m["type"], m["value"], m["name"]) for m in r["metrics"]])
            for r in index["results"]] == [("visual-question-answering", "vqav2", [
                ("vqa_accuracy", 41.0, "vqa_accuracy (0-shot)"), ("vqa_accuracy", 44.26, "vqa_accuracy (4-shot)")])]
    assert main(["push", "--model", str(tmp_path / "m"), "--repo", "someone/m", "--results", str(tmp_path)]) == 2
    assert "not a directory `flamingo eval --out` wrote" in capsys.readouterr().err
    hub.logged_in = False
    assert main(["push", "--model", str(tmp_path / "m"), "--repo", "someone/m"]) == 2
    assert "log in with a write token" in capsys.readouterr().err
    push_directory(str(tmp_path / "m"), "someone/m", token="hf_xyz")  # a token given: pushed
    with pytest.raises(ValueError, match="a directory is pushed as saved"):
        push_to_hub(str(tmp_path / "m"), "someone/m", trained_only=True)
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_pretrained("../no/such/model")


def test_a_renamed_or_copied_model_directory_is_pushed_with_a_card_named_for_the_repository(tmp_path, hub):
    """save_pretrained names the card after the directory (`final`); renamed or copied since, the card is still
    the generated one and is written again for the repository. One named for another repository (a downloaded
    model pushed elsewhere) too; a card edited by hand goes as it is."""
    model, processor = _gated_model()
    model.save_pretrained(str(tmp_path / "run" / "final"), processor=processor)
    shutil.copytree(tmp_path / "run" / "final", tmp_path / "my-model")
    assert main(["push", "--model", str(tmp_path / "my-model"), "--repo", "someone/my-model"]) == 0
    card = hub.repos["someone/my-model"]["main"]["README.md"].decode()
    assert 'load_pretrained("someone/my-model")' in card and "flamingo serve --model someone/my-model" in card
    assert "# my-model\n" in card and "final" not in card
    (tmp_path / "my-model" / "README.md").write_text(card)  # as a download of someone/my-model leaves it
    push_directory(str(tmp_path / "my-model"), "other/copy")
    assert 'load_pretrained("other/copy")' in hub.repos["other/copy"]["main"]["README.md"].decode()
    edited = card.replace("A Flamingo-style", "My Flamingo-style")
    (tmp_path / "my-model" / "README.md").write_text(edited)
    push_directory(str(tmp_path / "my-model"), "other/copy", replace_card=True)
    assert hub.repos["other/copy"]["main"]["README.md"].decode() == edited


def test_a_push_without_a_processor_removes_the_previous_models_processor_files(tmp_path, hub):
    """A re-push saved without a processor kept the previous model's tokenizer files and dropped its settings:
    `load_pretrained` then paired the new model with the old tokenizer. The repository now holds no processor, and
    loading it says so."""
    model, processor = _gated_model()
    push_to_hub(model, "me/model", processor=processor)
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "flamingo_processor.json"} <= set(hub.repos["me/model"]["main"])
    push_to_hub(_gated_model(seed=1)[0], "me/model")
    files = set(hub.repos["me/model"]["main"])
    assert not {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                "flamingo_processor.json"} & files
    assert {"flamingo.safetensors", "flamingo_config.json", "README.md", ".gitattributes"} <= files


def test_a_push_refuses_a_backbone_that_is_a_local_path_shaped_like_a_hub_name(tmp_path, hub, monkeypatch):
    """`of/lm`, a relative path, reads as the Hub name `of/lm`: pushed, nobody else could load the LM."""
    model, processor = _gated_model()
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    model.lm.save_pretrained(tmp_path / "of" / "lm")
    config = json.loads((tmp_path / "m" / "flamingo_config.json").read_text())
    (tmp_path / "m" / "flamingo_config.json").write_text(json.dumps({**config, "lm_name_or_path": "of/lm",
                                                                      "vision_name_or_path": "someone/clip"}))
    for part in ("vision", "lm"):  # trained-only: the backbones by reference
        shutil.rmtree(tmp_path / "m" / part)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="lm backbone is the local path 'of/lm', which nobody else can load"):
        push_directory(str(tmp_path / "m"), "someone/m")
    assert hub.commits == []


def test_the_refusal_of_a_trained_only_run_result_names_the_cli_way_to_save_it_whole(tmp_path, hub):
    """A `flamingo train` result (its final/ holds train_config.json) on local backbones is trained-only by default:
    the refusal names the CLI's remedy (the run again with train.save_trained_only=false rewrites final/ whole
    without training) besides the Python one; a directory saved from Python gets the Python one alone."""
    model, processor = _gated_model()
    model.vision.save_pretrained(tmp_path / "bb" / "vision")
    model.lm.save_pretrained(tmp_path / "bb" / "lm")
    model.config.vision_name_or_path = str(tmp_path / "bb" / "vision")
    model.config.lm_name_or_path = str(tmp_path / "bb" / "lm")
    final = str(tmp_path / "run" / "final")
    model.save_pretrained(final, trained_only=True, processor=processor)
    with pytest.raises(ValueError, match=r"nobody else can load: push a full checkpoint \(save_pretrained") as e:
        push_directory(final, "someone/m")
    assert "save_trained_only" not in str(e.value)
    (tmp_path / "run" / "final" / "train_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"`flamingo train` wrote this one: run `flamingo train CONFIG "
                                         r"train.save_trained_only=false` with its config again, which resumes at its "
                                         r"last step and rewrites final/ whole without training; from Python: "
                                         r"save_pretrained without trained_only\)"):
        push_directory(final, "someone/m")
    assert hub.commits == []


@pytest.mark.slow
def test_a_quantized_run_from_local_backbones_is_refused_with_a_remedy_that_pushes_and_loads(tmp_path, hub,
                                                                                               one_thread):
    """A QLoRA run (`quantize_frozen`) from local backbone directories writes a trained-only final/ that cannot be
    pushed; its rerun with train.save_trained_only=false is refused (quantized backbones are never saved whole, and
    it has no whole model to copy float ones from), and save_pretrained of the trained model too. The refusal names
    what works instead: loaded unquantized, final/ reads the float backbones it names; its mode set back and saved
    whole, that directory pushes, and the repository loads quantized again with the trained model's logits."""
    pytest.importorskip("torchao")
    from flamingo.train.config import load_config
    from flamingo.train.trainer import Trainer

    from train_fixtures import save_backbones, train_config, write_datasets

    vision, lm = save_backbones(str(tmp_path))
    data = write_datasets(str(tmp_path / "data"), n_pairs=8, n_docs=4)
    config = train_config(str(tmp_path), vision, lm, data, steps=1, out=str(tmp_path / "run"), interleaved=False,
                          progress=False)
    trainer = Trainer(load_config(config, ["model.flamingo.quantize_frozen=int8",
                                           "model.flamingo.lm_lora={r: 4, alpha: 8}"]))
    final = trainer.run()
    assert os.path.isfile(os.path.join(final, "train_config.json")) and not os.path.isdir(os.path.join(final, "lm"))
    with pytest.raises(ValueError, match=r"its backbones are quantized \(int8\), and quantized backbones are never "
                                         r"saved whole: save it whole from the float backbones it names") as e:
        push_directory(final, "someone/qlora")
    assert "save_trained_only" not in str(e.value) and hub.commits == []
    remedy = re.search(r"names, `(.+?)`, and push DIR, which loads quantized again", str(e.value))
    assert remedy is not None, str(e.value)
    whole = str(tmp_path / "whole")
    exec(remedy.group(1), {"DIR": whole})  # the message's own code, as a user pastes it
    assert os.path.isdir(os.path.join(whole, "vision")) and os.path.isdir(os.path.join(whole, "lm"))
    push_directory(whole, "someone/qlora")
    assert json.loads(hub.repos["someone/qlora"]["main"]["flamingo_config.json"])["quantize_frozen"] == "int8"

    cache = tmp_path / "hf" / "hub"
    hub.to_cache("someone/qlora", cache, tmp_path / "scratch")
    (logits,) = _load_offline(tmp_path, cache, [{"name": "someone/qlora"}])
    expected = _logits(trainer.model.eval(), trainer.processor)
    assert torch.allclose(logits, expected, atol=1e-4, rtol=0)

    # saved from Python without its processor: the remedy reads the model alone
    from flamingo import Flamingo
    from flamingo.model.quantize import quantized_mode

    trainer.model.save_pretrained(str(tmp_path / "bare"), trained_only=True)
    with pytest.raises(ValueError, match="its backbones are quantized") as e:
        push_directory(str(tmp_path / "bare"), "someone/qlora")
    remedy = re.search(r"names, `(.+?)`, and push DIR", str(e.value))
    assert remedy is not None and "Flamingo.from_pretrained" in remedy.group(1), str(e.value)
    exec(remedy.group(1), {"DIR": str(tmp_path / "bare-whole")})
    reloaded = Flamingo.from_pretrained(str(tmp_path / "bare-whole"))
    assert quantized_mode(reloaded) == "int8" and os.path.isdir(tmp_path / "bare-whole" / "lm")
    assert torch.allclose(_logits(reloaded.eval(), trainer.processor), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}])
def test_a_push_that_cannot_reach_the_hub_is_a_clear_error(tmp_path, env):
    model, processor = _gated_model()
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    result = subprocess.run([sys.executable, "-m", "flamingo.cli", "push", "--model", str(tmp_path / "m"), "--repo",
                             "someone/m"], env={**os.environ, "HF_TOKEN": "hf_x", **env}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "could not reach the Hub" in result.stderr and "Traceback" not in result.stderr


def test_a_server_of_a_hub_model_names_it_by_its_repository(tmp_path):
    pytest.importorskip("fastapi")
    from flamingo.serve.server import settings_for

    assert settings_for("someone/tiny-flamingo").model_name == "someone/tiny-flamingo"
    (tmp_path / "runs" / "final").mkdir(parents=True)
    assert settings_for(str(tmp_path / "runs" / "final")).model_name == "final"
    assert settings_for("someone/tiny-flamingo", model_name="x").model_name == "x"


def test_a_converted_repository_downloads_safetensors_or_bin_never_both(tmp_path, monkeypatch):
    """Foreign checkpoints (converters, OpenFlamingo's LMs) download configs, tokenizer files and one weight format:
    the safetensors when the repository has them, else its .bin files."""
    import fnmatch

    import huggingface_hub

    from flamingo.convert.checkpoints import checkpoint_dir

    remote = {"a/both": ["config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin",
                         "flax_model.msgpack"],
              "a/bin": ["config.json", "tokenizer.model", "pytorch_model-00001-of-00002.bin",
                        "pytorch_model-00002-of-00002.bin"]}
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, repo_type="model"):
        assert repo_type == "model"
        calls.append(repo_id)
        directory = tmp_path / repo_id.replace("/", "--")
        directory.mkdir(exist_ok=True)
        for name in remote[repo_id]:
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (directory / name).write_text("x")
        return str(directory)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    both = Path(checkpoint_dir("a/both", "model"))
    assert sorted(os.listdir(both)) == ["config.json", "model.safetensors", "tokenizer.json"] and calls == ["a/both"]
    only_bin = Path(checkpoint_dir("a/bin", "model"))
    assert sorted(os.listdir(only_bin)) == ["config.json", "pytorch_model-00001-of-00002.bin",
                                            "pytorch_model-00002-of-00002.bin", "tokenizer.model"]
    assert calls == ["a/both", "a/bin", "a/bin"]
    checkpoint_dir("a/bin", "model", allow_bin=False)  # safetensors-only readers (IDEFICS) never fetch .bin
    assert calls[3:] == ["a/bin"]


def _eval_out(path: Path, task: str, data: str, metric: str, means: dict[int, float]) -> str:
    """A directory as `flamingo eval --out` leaves it (results.json, results.md titled with the model's local path)."""
    path.mkdir(parents=True)
    rows = [{"shots": k, "metric": metric, "mean": mean, "std": 0.5} for k, mean in means.items()]
    (path / "results.json").write_text(json.dumps({"task": task, "model": "/home/alice/runs/final", "data": data,
                                                   "summary": rows}))
    cells = " | ".join(f"{mean:.2f} ± 0.50" for mean in means.values())
    (path / "results.md").write_text(f"# {task} — /home/alice/runs/final\n\n| metric | {' | '.join(map(str, means))}"
                                     f" |\n|---|\n| {metric} | {cells} |\n")
    return str(path)


def test_results_of_one_task_on_several_datasets_are_filed_under_each_dataset(tmp_path, hub):
    """Flamingo's suite has several datasets per task (VQAv2, OK-VQA, TextVQA are all `vqa`): each dataset is its
    own model-index entry holding its own values, named by the task (the shots are in the metrics' names), and its
    own table headed by task and dataset, never by the evaluator's local path. huggingface_hub's parser reads the
    entries back as they were written."""
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    model, processor = _gated_model()
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    outs = [_eval_out(tmp_path / "e1", "vqa", "/data/vqav2", "vqa_accuracy", {0: 52.1, 4: 54.1}),
            _eval_out(tmp_path / "e2", "vqa", "/data/okvqa/", "vqa_accuracy", {0: 37.4, 4: 39.4}),
            _eval_out(tmp_path / "e3", "vqa", "hf://datasets/org/suite@v1/textvqa", "vqa_accuracy", {0: 30.0}),
            _eval_out(tmp_path / "e4", "captioning", "/data/coco", "cider", {0: 80.0, 4: 90.0})]
    push_directory(str(tmp_path / "m"), "someone/m", results=outs)
    text = hub.repos["someone/m"]["main"]["README.md"].decode()
    model_index = ModelCard(text).data.to_dict()["model-index"]
    assert [(r["task"]["name"], r["dataset"]["type"], r["dataset"]["name"], r["dataset"].get("config"),
             r["dataset"].get("revision"), [(m["name"], m["value"]) for m in r["metrics"]])
            for r in model_index[0]["results"]] == [
        ("vqa", "vqav2", "vqav2", None, None, [("vqa_accuracy (0-shot)", 52.1), ("vqa_accuracy (4-shot)", 54.1)]),
        ("vqa", "okvqa", "okvqa", None, None, [("vqa_accuracy (0-shot)", 37.4), ("vqa_accuracy (4-shot)", 39.4)]),
        ("vqa", "org/suite", "org/suite/textvqa", "textvqa", "v1", [("vqa_accuracy (0-shot)", 30.0)]),
        ("captioning", "coco", "coco", None, None, [("cider (0-shot)", 80.0), ("cider (4-shot)", 90.0)])]
    name, parsed = model_index_to_eval_results(model_index)
    assert len(parsed) == 7 and eval_results_to_model_index(name, parsed) == model_index
    assert [line for line in text.splitlines() if line.startswith("### ")] == [
        "### vqa on vqav2", "### vqa on okvqa", "### vqa on org/suite/textvqa", "### captioning on coco"]
    assert "/home/alice" not in text and "/data/" not in text

    commits = len(hub.commits)  # the same shots on the same dataset twice: one entry, two values of one name
    with pytest.raises(ValueError, match=r"both hold vqa_accuracy \(0-shot\) of visual-question-answering on the "
                                         "dataset 'vqav2'"):
        push_directory(str(tmp_path / "m"), "someone/m", results=[outs[0], outs[1], outs[0]])
    assert len(hub.commits) == commits
    # other shots of that task on that dataset, measured in another run: more metrics of its entry
    more = _eval_out(tmp_path / "e5", "vqa", "/data/vqav2", "vqa_accuracy", {32: 58.0})
    push_directory(str(tmp_path / "m"), "someone/m", results=[outs[0], more])
    model_index = ModelCard(hub.repos["someone/m"]["main"]["README.md"].decode()).data.to_dict()["model-index"]
    assert [(r["dataset"]["name"], [(m["name"], m["value"]) for m in r["metrics"]])
            for r in model_index[0]["results"]] == [
        ("vqav2", [("vqa_accuracy (0-shot)", 52.1), ("vqa_accuracy (4-shot)", 54.1), ("vqa_accuracy (32-shot)", 58.0)])]


def _index(hub, repo: str = "someone/m") -> list[tuple]:
    """The pushed card's model-index entries: (task name, dataset name, [(metric name, value)])."""
    model_index = ModelCard(hub.repos[repo]["main"]["README.md"].decode()).data.to_dict()["model-index"]
    return [(r["task"]["name"], r["dataset"]["name"], [(m["name"], m["value"]) for m in r["metrics"]])
            for r in model_index[0]["results"]]


def _headings(hub, repo: str = "someone/m") -> list[str]:
    return [line for line in hub.repos[repo]["main"]["README.md"].decode().splitlines() if line.startswith("### ")]


def test_datasets_whose_folders_share_a_name_are_told_apart_by_their_paths(tmp_path, hub):
    """OK-VQA and VQAv2 both evaluate on COCO's val2014 images (`--data .../okvqa/val2014`, `.../vqav2/val2014`):
    named by the folder alone they were one dataset, refused as a duplicate at equal shots and merged into one entry
    otherwise. Each is named by its parent folder and its own; the same path twice at the same shots is still refused,
    and so are paths that even so share a name (telling them apart would publish more of the machine's paths)."""
    model, processor = _gated_model()
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    okvqa = _eval_out(tmp_path / "e1", "vqa", "/datasets/okvqa/val2014", "vqa_accuracy", {0: 37.4})
    vqav2 = _eval_out(tmp_path / "e2", "vqa", "/datasets/vqav2/val2014/", "vqa_accuracy", {0: 51.2, 4: 55.0})
    coco = _eval_out(tmp_path / "e3", "captioning", "/datasets/coco", "cider", {0: 80.0})
    push_directory(str(tmp_path / "m"), "someone/m", results=[okvqa, vqav2, coco])
    assert _index(hub) == [("vqa", "okvqa/val2014", [("vqa_accuracy (0-shot)", 37.4)]),
                           ("vqa", "vqav2/val2014", [("vqa_accuracy (0-shot)", 51.2), ("vqa_accuracy (4-shot)", 55.0)]),
                           ("captioning", "coco", [("cider (0-shot)", 80.0)])]
    assert _headings(hub) == ["### vqa on okvqa/val2014", "### vqa on vqav2/val2014", "### captioning on coco"]
    again = _eval_out(tmp_path / "e4", "vqa", "/datasets/okvqa/val2014/", "vqa_accuracy", {0: 38.0})
    with pytest.raises(ValueError, match=r"both hold vqa_accuracy \(0-shot\) of visual-question-answering on the "
                                         "dataset 'okvqa/val2014'"):
        push_directory(str(tmp_path / "m"), "someone/m", results=[okvqa, vqav2, again])
    push_directory(str(tmp_path / "m"), "someone/m", results=[vqav2])  # alone: its folder's name, as before
    assert _index(hub) == [("vqa", "val2014", [("vqa_accuracy (0-shot)", 51.2), ("vqa_accuracy (4-shot)", 55.0)])]

    from flamingo.hub import _dataset_names  # a path that ends another, and paths alike but for their root

    assert _dataset_names(["/a/okvqa/val2014", "/a/vqav2/val2014", "val2014", "/x/val2014", "/data/y",
                           "hf://datasets/org/val2014"]) == {
        "/a/okvqa/val2014": "okvqa/val2014", "/a/vqav2/val2014": "vqav2/val2014", "val2014": "val2014",
        "/x/val2014": "x/val2014", "/data/y": "y"}
    for alike in (["/home/alice/okvqa/val2014", "/home/bob/okvqa/val2014"], ["/data/x", "data/x"]):
        with pytest.raises(ValueError, match=r"would both be named '(okvqa/val2014|data/x)' on the card"):
            _dataset_names(alike)
    # results whose every query was skipped (no mean) still push, with their table, as before
    skipped = _eval_out(tmp_path / "e5", "vqa", "/datasets/textvqa", "vqa_accuracy", {0: 1.0})
    written = json.loads((Path(skipped) / "results.json").read_text())
    written["summary"][0]["mean"] = None
    (Path(skipped) / "results.json").write_text(json.dumps(written))
    push_directory(str(tmp_path / "m"), "someone/m", results=[vqav2, skipped])
    assert _headings(hub) == ["### vqa on val2014", "### vqa on textvqa"]


def test_two_tasks_of_one_task_type_on_one_dataset_are_metrics_named_by_their_task(tmp_path, hub):
    """`multi_image` and its baseline `multi_image_plain` are both visual question answering on the same data: the
    model-index (one entry per task type and dataset) filed the baseline's accuracy as multi_image's, or refused the
    two at equal shots. Their metrics are named by task, the entry by both; a lone task keeps its plain names, and
    the same task twice at the same shots is still refused."""
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    model, processor = _gated_model()
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    refs = _eval_out(tmp_path / "e1", "multi_image", "/datasets/mmicl_eval", "accuracy", {0: 61.0, 4: 63.0})
    plain = _eval_out(tmp_path / "e2", "multi_image_plain", "/datasets/mmicl_eval", "accuracy", {0: 48.0, 4: 50.0})
    vqa = _eval_out(tmp_path / "e3", "vqa", "/datasets/vqav2", "vqa_accuracy", {0: 52.0})
    push_directory(str(tmp_path / "m"), "someone/m", results=[refs, plain, vqa])
    assert _index(hub) == [
        ("multi_image, multi_image_plain", "mmicl_eval", [
            ("accuracy (multi_image, 0-shot)", 61.0), ("accuracy (multi_image, 4-shot)", 63.0),
            ("accuracy (multi_image_plain, 0-shot)", 48.0), ("accuracy (multi_image_plain, 4-shot)", 50.0)]),
        ("vqa", "vqav2", [("vqa_accuracy (0-shot)", 52.0)])]
    assert _headings(hub) == ["### multi_image on mmicl_eval", "### multi_image_plain on mmicl_eval",
                              "### vqa on vqav2"]
    model_index = ModelCard(hub.repos["someone/m"]["main"]["README.md"].decode()).data.to_dict()["model-index"]
    name, parsed = model_index_to_eval_results(model_index)
    assert len(parsed) == 5 and eval_results_to_model_index(name, parsed) == model_index

    push_directory(str(tmp_path / "m"), "someone/m", results=[plain])  # alone: today's names
    assert _index(hub) == [("multi_image_plain", "mmicl_eval", [("accuracy (0-shot)", 48.0),
                                                                ("accuracy (4-shot)", 50.0)])]
    commits = len(hub.commits)
    again = _eval_out(tmp_path / "e4", "multi_image_plain", "/datasets/mmicl_eval", "accuracy", {4: 51.0})
    with pytest.raises(ValueError, match=r"'.*e2' and '.*e4' both hold accuracy \(multi_image_plain, 4-shot\) of "
                                         "visual-question-answering on the dataset 'mmicl_eval'"):
        push_directory(str(tmp_path / "m"), "someone/m", results=[refs, plain, again])
    assert len(hub.commits) == commits


def test_a_full_push_of_a_model_built_from_local_directories_publishes_no_local_path(tmp_path, hub):
    """The backbones' local paths name folders nobody else has (a full repository loads them from `vision/` and
    `lm/`): the card says so and the pushed config names none; the run's `train_config.json` (data and output paths)
    is left out unless asked for. The repository loads with the same logits."""
    from flamingo import FlamingoConfig, from_backbones
    from flamingo.tiny import set_gates

    vision, tokenizer = tiny_vision("clip"), tiny_tokenizer()
    lm = tiny_lm("llama", vocab_size=len(tokenizer))
    vision.save_pretrained(tmp_path / "clip")
    lm.save_pretrained(tmp_path / "llama")
    model, processor = from_backbones(str(tmp_path / "clip"), str(tmp_path / "llama"), tokenizer,
                                      FlamingoConfig(num_latents=4, resampler_depth=1, xattn_every=2),
                                      image_processor=tiny_image_processor("clip"))
    set_gates(model, 0.5)
    model.save_pretrained(str(tmp_path / "final"), processor=processor)
    assert str(tmp_path / "clip") in (tmp_path / "final" / "README.md").read_text()  # the local card names it
    (tmp_path / "final" / "train_config.json").write_text(json.dumps({"data": [{"path": str(tmp_path / "d.jsonl")}]}))
    push_directory(str(tmp_path / "final"), "someone/built-here")

    files = hub.repos["someone/built-here"]["main"]
    assert [path for path, data in files.items() if str(tmp_path).encode() in data] == []
    assert "train_config.json" not in files
    card = files["README.md"].decode()
    assert "| vision tower | saved in `vision/` (frozen) |" in card and "| language model | saved in `lm/` (frozen) |" \
        in card and 'load_pretrained("someone/built-here")' in card
    config = json.loads(files["flamingo_config.json"])
    assert (config["vision_name_or_path"], config["lm_name_or_path"]) == (None, None)
    cache = tmp_path / "hf" / "hub"
    hub.to_cache("someone/built-here", cache, tmp_path / "scratch")
    (logits,) = _load_offline(tmp_path, cache, [{"name": "someone/built-here"}])
    assert torch.allclose(logits, _logits(model, processor), atol=1e-5, rtol=0)


def test_a_hub_backbone_read_at_a_commit_stays_named_whatever_folders_the_push_runs_beside(tmp_path, monkeypatch):
    """A Hub name with its recorded commit was read from the Hub: a push run where a folder of that name happens to
    exist keeps it (and its commit); a Hub-shaped name without a commit that exists here is a local path."""
    import dataclasses

    from flamingo import FlamingoConfig
    from flamingo.model.card import published_config

    (tmp_path / "saved" / "lm").mkdir(parents=True)
    (tmp_path / "saved" / "vision").mkdir()
    (tmp_path / "org" / "lm").mkdir(parents=True)  # `org/lm` as a folder of the working directory
    monkeypatch.chdir(tmp_path)
    pinned = FlamingoConfig(lm_name_or_path="org/lm", lm_revision="a" * 40, vision_name_or_path="/abs/clip")
    published = published_config(str(tmp_path / "saved"), pinned)
    assert (published.lm_name_or_path, published.lm_revision, published.vision_name_or_path) == \
        ("org/lm", "a" * 40, None)
    unpinned = published_config(str(tmp_path / "saved"), dataclasses.replace(pinned, lm_revision=None))
    assert unpinned.lm_name_or_path is None


def test_a_push_replaces_or_removes_the_previous_runs_train_config(tmp_path, hub):
    """`train_config.json` describes the run that made the weights beside it: pushed on request, a later push of
    another model (without one) removes it."""
    model, processor = _gated_model()
    model.save_pretrained(str(tmp_path / "run"), processor=processor)
    (tmp_path / "run" / "train_config.json").write_text('{"train": {"steps": 4}}')
    assert main(["push", "--model", str(tmp_path / "run"), "--repo", "me/m", "--train-config"]) == 0
    assert hub.repos["me/m"]["main"]["train_config.json"] == b'{"train": {"steps": 4}}'
    push_to_hub(_gated_model(seed=1)[0], "me/m", processor=processor)
    assert "train_config.json" not in hub.repos["me/m"]["main"]


def test_a_symlinked_backbone_folder_is_uploaded_as_its_content(tmp_path, hub):
    """A `lm/` shared between checkpoints by a link loads locally; pushed, it is uploaded as what it points to (it was
    skipped, and the repository's earlier `lm/` deleted in the same commit). A link that loops or leads nowhere, and
    a backbone folder without its config, are refused before any Hub call."""
    model, processor = _gated_model()
    push_to_hub(model, "me/m", processor=processor)  # full: the repository holds lm/
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    shutil.move(tmp_path / "m" / "lm", tmp_path / "shared-lm")
    os.symlink(tmp_path / "shared-lm", tmp_path / "m" / "lm")
    push_directory(str(tmp_path / "m"), "me/m")
    files = hub.repos["me/m"]["main"]
    assert {f"lm/{name}" for name in os.listdir(tmp_path / "shared-lm")} == {p for p in files if p.startswith("lm/")}
    for name in os.listdir(tmp_path / "shared-lm"):
        assert files[f"lm/{name}"] == (tmp_path / "shared-lm" / name).read_bytes()

    commits = len(hub.commits)
    os.symlink(tmp_path / "m", tmp_path / "shared-lm" / "loop")
    with pytest.raises(ValueError, match="links to a folder that holds it"):
        push_directory(str(tmp_path / "m"), "me/other")
    os.remove(tmp_path / "shared-lm" / "loop")
    os.symlink(tmp_path / "nowhere", tmp_path / "m" / "notes.txt")
    with pytest.raises(ValueError, match="a broken link"):
        push_directory(str(tmp_path / "m"), "me/other")
    os.remove(tmp_path / "m" / "notes.txt")
    os.remove(tmp_path / "m" / "lm")
    (tmp_path / "m" / "lm").mkdir()
    with pytest.raises(ValueError, match="lm' holds no config.json"):
        push_directory(str(tmp_path / "m"), "me/other")
    assert len(hub.commits) == commits and "me/other" not in hub.repos


def test_push_to_hub_checks_the_repository_name_before_saving(hub, monkeypatch):
    """A model is saved whole before its upload (minutes for a large one): a name the Hub refuses is refused first."""
    from flamingo import Flamingo

    model, processor = _gated_model()

    def save_pretrained(*args, **kwargs):
        raise AssertionError("saved before the repository name was checked")

    monkeypatch.setattr(Flamingo, "save_pretrained", save_pretrained)
    for repo_id in ("me/..", "me/.", "a/b/c", "me/a b", "me/na--me", "me/name-", "me/name.git"):
        with pytest.raises(ValueError, match="is not a Hub repository name"):
            push_to_hub(model, repo_id, processor=processor)
    assert hub.repos == {}


def test_a_one_word_name_is_a_path_and_its_error_gives_the_org_form(tmp_path, monkeypatch):
    """A name without `/` (`gpt2`, which transformers' `from_pretrained` still resolves on the Hub) is read as a path
    here; when no such directory exists the error says that Hub names are org/name. A path with `/` gets no hint."""
    from flamingo.runtime.hub import local_or_hub

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"LM directory not found: gpt2 \(a Hub repository is named org/name.*"
                                                r"`openai-community/gpt2`\)"):
        local_or_hub("gpt2", "LM")
    with pytest.raises(FileNotFoundError) as missing:
        local_or_hub("./no/such/lm", "LM")
    assert str(missing.value) == "LM directory not found: ./no/such/lm"
    (tmp_path / "gpt2").mkdir()
    assert local_or_hub("gpt2", "LM") == "local"


def test_unknown_keywords_are_refused_before_the_save_or_the_download(monkeypatch):
    """transformers' keywords (`create_pr`, `max_shard_size`; `device_map` when loading) reached the upload after
    the whole model was saved, or `Flamingo.from_pretrained` after the whole snapshot was downloaded: each is a
    TypeError before that work."""
    import flamingo.build as build

    model, processor = _gated_model(seed=0)

    def no_save(*args, **kwargs):
        raise AssertionError("saved before the keywords were checked")

    monkeypatch.setattr(model, "save_pretrained", no_save)
    with pytest.raises(TypeError, match="create_pr"):
        push_to_hub(model, "someone/tiny", processor=processor, create_pr=True)
    monkeypatch.setattr(build, "metadata_dir", no_save)
    with pytest.raises(TypeError, match="device_map"):
        build.load_pretrained("someone/tiny", device_map="auto")
