"""Equal to OpenFlamingo v1 (open_flamingo 0.0.2: OpenFlamingo-9B v1, Med-Flamingo): a v1 checkpoint converted with
`attend_next_image` gives v1's logits and greedy tokens on the same backbones, and every path of ours that splits
a prompt (chunked prefill, scored continuations) computes the same rule.

v1 is installed apart from 2.0.1 (same package name): `pip install --no-deps --target .peers/open-flamingo-0.0.2
open-flamingo==0.0.2` (flamingo/peers/openflamingo.py)."""

import copy

import pytest
import torch

pytestmark = pytest.mark.peer
pytest.importorskip("einops_exts", reason="the OpenFlamingo peer needs einops-exts")
from test_convert_bad_input import open_clip_tower  # noqa: E402

from flamingo.convert import convert_openflamingo, save_openflamingo_checkpoint  # noqa: E402
from flamingo.model.generation import generate, score_batch  # noqa: E402
from flamingo.model.prefill import Prefill  # noqa: E402
from flamingo.peers.openflamingo import openflamingo_v1_dir  # noqa: E402
from flamingo.runtime.compat import CONTINUOUS_BATCHING  # noqa: E402
from flamingo.tiny import random_image, tiny_image_processor, tiny_lm, tiny_vision  # noqa: E402

from helpers import (  # noqa: E402
    continuous_batch_greedy,
    hub_cache_entry,
    openflamingo_peer,
    write_openflamingo_files,
)

if not (openflamingo_v1_dir() / "open_flamingo" / "src" / "flamingo_lm.py").is_file():
    pytest.skip(f"OpenFlamingo v1 is not installed in {openflamingo_v1_dir()}", allow_module_level=True)

# Text before the first image, between images and after the last: each sees something else under v1's rule.
PROMPTS = ["Intro <image>Question: what? Answer: red.<|endofchunk|><image>Question: and? Answer: two."
           "<|endofchunk|><image>Question: this? Answer:",
           "<image>A photo of a cat.<|endofchunk|><image>A dog"]
MEDIA = [[random_image(0), random_image(1), random_image(2)], [random_image(3), random_image(4)]]


def _peer(every: int = 2, seed: int = 0):
    return openflamingo_peer(every, seed, v1=True, attn_gates=(0.5, 1.0))


def _convert(peer, vision, lm, tok):
    return convert_openflamingo(copy.deepcopy(peer.state_dict()), copy.deepcopy(vision), copy.deepcopy(lm),
                                copy.deepcopy(tok), image_processor=tiny_image_processor("clip"),
                                attend_next_image=True)


def _peer_logits(peer, batch):
    with torch.no_grad():
        return peer(vision_x=batch["images"].clone(), lang_x=batch["input_ids"],
                    attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def v1():
    peer, vision, lm, tok = _peer()
    ours, processor = _convert(peer, vision, lm, tok)
    return peer, ours, processor, (vision, lm, tok)


def test_logits_equal_openflamingo_v1(v1):
    peer, ours, processor, backbones = v1
    assert ours.config.attend_next_image
    batch = processor(PROMPTS, images=MEDIA, padding_side="right")
    with torch.no_grad():
        mine = ours(**batch).logits
    theirs = _peer_logits(peer, batch)
    real = batch["attention_mask"].bool()
    assert (mine[real] - theirs[real]).abs().max() <= 1e-5

    # Not vacuous: the paper's rule (2.x's) computes something else on the same weights (the state without v1's
    # whole CLIP, which only a v1 conversion takes) ...
    vision, lm, tok = backbones
    v2_rule, _ = convert_openflamingo({k: v for k, v in peer.state_dict().items() if not k.startswith("vision_")},
                                      copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                      image_processor=tiny_image_processor("clip"))
    with torch.no_grad():
        assert (v2_rule(**batch).logits[real] - theirs[real]).abs().max() > 1e-3


def test_generate_equals_openflamingo_v1(v1):
    peer, ours, processor, _ = v1
    batch = processor(PROMPTS, images=MEDIA, padding_side="left")
    mine = generate(ours, batch["input_ids"], batch["attention_mask"], batch["images"], batch["num_media"],
                    max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        theirs = peer.generate(batch["images"].clone(), batch["input_ids"], batch["attention_mask"],
                               max_new_tokens=6, num_beams=1)
    n = min(mine.shape[1], theirs.shape[1])
    assert torch.equal(mine[:, :n], theirs[:, :n])
    assert mine.shape[1] > batch["input_ids"].shape[1]


serve_path = pytest.mark.skipif(not CONTINUOUS_BATCHING, reason="the server's prefill needs transformers >= 5.4")


@serve_path
def test_chunked_prefill_and_scores_follow_the_rule(v1):
    """A prompt prefilled in chunks of 3 (the server's path) and candidates scored after it (eval's) equal one
    forward: a chunk's text sees an image that only a later chunk holds."""
    _, ours, processor, _ = v1
    batch = processor(PROMPTS[:1], images=MEDIA[:1])
    ids = batch["input_ids"][0]
    with torch.no_grad():
        whole = ours(**batch).logits[0]  # (T, V)
    prefill = Prefill(ours, ids, batch["images"], batch["num_media"], batch.get("num_frames"), chunk=3)
    row = None
    while row is None:
        row = prefill.step()
    assert (row.logits - whole[-1]).abs().max() <= 1e-5
    assert int(row.decode_index) == 0  # generated text follows the last image: it sees none

    context, continuation = ids[:-2], ids[-2:].tolist()
    scored = score_batch(ours, context[None], [[continuation]], images=batch["images"],
                         num_media=batch["num_media"])[0]
    logprobs = whole[-3:-1].float().log_softmax(-1)
    expected = logprobs[torch.arange(2), torch.tensor(continuation)].sum()
    assert torch.allclose(scored, expected[None], atol=1e-4)


def test_v1_rule_is_refused_where_it_cannot_hold(v1, tmp_path):
    from flamingo.config import FlamingoConfig

    _, ours, processor, _ = v1
    with pytest.raises(ValueError, match="attend_next_image"):
        FlamingoConfig(attend_next_image=True, only_attend_last_image=False)
    batch = processor(PROMPTS[:1], images=MEDIA[:1])
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        generate(ours, batch["input_ids"], images=batch["images"], num_media=batch["num_media"], max_new_tokens=2,
                 prefill_chunk_size=4)
    with pytest.raises(ValueError, match="packed rows"):
        ours(**batch, document_ids=torch.zeros_like(batch["input_ids"]))


def test_export_runs_in_openflamingo_v1(v1, tmp_path):
    """A v1 model (converted, or fine-tuned here) exports to a checkpoint v1's own code loads: the same logits."""
    peer, ours, processor, _ = v1
    recipe = save_openflamingo_checkpoint(ours, str(tmp_path / "of.pt"))
    assert recipe["open_flamingo"].startswith("0.0.2")
    fresh, _, _, _ = openflamingo_peer(2, seed=0, v1=True)  # the same backbones; its trained parts wiped
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if name.startswith(("perceiver.", "lang_encoder.gated_cross_attn_layers.", "lang_encoder.model.embed")):
                p.zero_()
    result = fresh.load_state_dict(torch.load(tmp_path / "of.pt", weights_only=True), strict=False)
    assert not result.unexpected_keys
    batch = processor(PROMPTS, images=MEDIA, padding_side="right")
    real = batch["attention_mask"].bool()
    assert (_peer_logits(fresh, batch)[real] - _peer_logits(peer, batch)[real]).abs().max() <= 1e-5


def test_convert_command_v1_and_published_names(tmp_path):
    from flamingo import load_pretrained
    from flamingo.cli import main

    base = ["convert", "open-flamingo", *write_openflamingo_files(*_peer(every=1, seed=4), tmp_path, "model.pt")]
    assert main(base + ["--out", str(tmp_path / "v1"), "--v1"]) == 0
    assert main(base + ["--out", str(tmp_path / "v2")]) == 0
    assert main(base + ["--out", str(tmp_path / "half"), "--v1", "--dtype", "bf16"]) == 0  # trained parts: fp32
    from safetensors import safe_open

    sizes = {}
    for name in ("v1", "half"):
        with safe_open(str(tmp_path / name / "flamingo.safetensors"), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        sizes[name] = (tmp_path / name / "flamingo.safetensors").stat().st_size
        assert dtypes == ({"F32"} if name == "v1" else {"BF16"}), (name, dtypes)
    assert sizes["half"] < 0.6 * sizes["v1"]
    loaded, _ = load_pretrained(str(tmp_path / "v1"))
    assert loaded.config.attend_next_image  # saved and loaded with the model, and its card says so
    assert "OpenFlamingo v1's rule" in (tmp_path / "v1" / "README.md").read_text()
    assert not load_pretrained(str(tmp_path / "v2"))[0].config.attend_next_image
    # The published v1 checkpoints sit on LLaMA-7B, which has no hub name: refused before any download.
    assert main(["convert", "open-flamingo", "--model", "med-flamingo/med-flamingo", "--out", str(tmp_path / "m")]) == 2


@serve_path
def test_continuous_batch_decodes_like_generate(v1):
    """The server's path (chunked prefill, then steps of a `DecodeBatch` holding two rows) gives each prompt the
    greedy tokens `generate` gives it alone."""
    _, ours, processor, _ = v1
    steps = 5
    rows = continuous_batch_greedy(ours, processor, list(zip(PROMPTS, MEDIA)), steps)
    for (prompt, media), got in zip(zip(PROMPTS, MEDIA), rows):
        b = processor(prompt, images=media)
        alone = ours.generate(**b, max_new_tokens=steps, min_new_tokens=steps)[0, b["input_ids"].shape[1]:]
        assert got == alone.tolist()


def test_a_whole_checkpoint_refuses_another_lm(v1):
    """Med-Flamingo's model.pt is a whole `state_dict()`: its frozen LM tensors must be the given LM's."""
    peer, _, _, (vision, lm, tok) = v1
    other = tiny_lm("llama", vocab_size=len(tok), seed=7)
    with pytest.raises(ValueError, match="differ from the given LM"):
        convert_openflamingo(copy.deepcopy(peer.state_dict()), copy.deepcopy(vision), other, copy.deepcopy(tok),
                             image_processor=tiny_image_processor("clip"), attend_next_image=True)


def _with_tower(peer, tower: dict) -> dict:
    """The peer's whole state with its tower replaced by `tower` (keys under `vision_encoder.visual.`)."""
    state = {k: v.clone() for k, v in peer.state_dict().items() if not k.startswith("vision_encoder.visual.")}
    return {**state, **tower}


def _hf_tower(tower: dict) -> dict:
    return {f"vision_encoder.visual.tower.{k}": v.clone() for k, v in tower.items()}


def test_a_whole_v1_state_holds_clip_and_converts_with_its_tower_in_either_naming(v1):
    """open_flamingo 0.0.2 keeps open_clip's whole CLIP as `vision_encoder` (and runs its `.visual`): a whole
    `state_dict()` holds the tower under `vision_encoder.visual.` and CLIP's text tower beside it, whose 77 positions
    and other width are not the tower's. The text tower is skipped, the tower compared: under the peer's HF names (the
    fixture) or open_clip's (Med-Flamingo's model.pt), v1's logits."""
    peer, _, processor, (vision, lm, tok) = v1
    state = peer.state_dict()
    assert any(k.startswith("vision_encoder.visual.tower.") and k.endswith("embeddings.patch_embedding.weight")
               for k in state)  # (transformers 4's tower names it under `vision_model.`)
    assert state["vision_encoder.positional_embedding"].shape == (77, 16)
    assert "vision_encoder.transformer.resblocks.0.attn.in_proj_weight" in state
    med = _with_tower(peer, open_clip_tower(vision.state_dict(), "vision_encoder.visual."))
    ours, _ = convert_openflamingo(med, copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                   image_processor=tiny_image_processor("clip"), attend_next_image=True)
    batch = processor(PROMPTS, images=MEDIA, padding_side="right")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        assert (ours(**batch).logits[real] - _peer_logits(peer, batch)[real]).abs().max() <= 1e-5


def test_a_whole_v1_state_without_the_v1_rule_is_refused(v1):
    """Only open_flamingo 0.0.x saves its whole CLIP: converted with 2.x's rule (no --v1), its logits were up to 0.54
    off v1's, without a word."""
    peer, _, _, (vision, lm, tok) = v1
    with pytest.raises(ValueError, match="OpenFlamingo v1's whole CLIP .* --v1"):
        convert_openflamingo(peer.state_dict(), copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                             image_processor=tiny_image_processor("clip"))


@pytest.mark.parametrize("naming", ["hf", "open_clip"])
def test_a_whole_v1_state_refuses_another_tower(v1, naming):
    """Another tower of the same shape, under `vision_encoder.visual.`, differs in its values; in open_clip's names
    one of other shapes is named by the tower's tensor (not the text tower's `positional_embedding` beside it)."""
    peer, _, _, (vision, lm, tok) = v1
    layout = _hf_tower if naming == "hf" else (lambda t: open_clip_tower(t, "vision_encoder.visual."))

    def convert(state):
        return convert_openflamingo(state, copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                    image_processor=tiny_image_processor("clip"), attend_next_image=True)

    with pytest.raises(ValueError, match="frozen vision tower it was trained on, and its tensors differ from the "
                                         "given tower's .*--vision"):
        convert(_with_tower(peer, layout(tiny_vision("clip", seed=7).state_dict())))
    if naming == "open_clip":
        wider = {**layout(vision.state_dict()), "vision_encoder.visual.positional_embedding": torch.zeros(577, 32)}
        with pytest.raises(ValueError, match="'vision_encoder.visual.positional_embedding': \\(577, 32\\) there, "
                                             "\\(17, 32\\) in the given tower"):
            convert(_with_tower(peer, wider))


def test_published_med_flamingo_converts_offline_from_the_hub_cache(tmp_path):
    """`--model med-flamingo/med-flamingo --lm DIR` in a fresh offline process whose hub cache holds a tiny stand-in
    under the published name (its `model.pt`, a whole v1 `state_dict()`) and the CLIP tower's: v1's logits."""
    import os
    import subprocess
    import sys

    from flamingo import load_pretrained
    from flamingo.convert.openflamingo import CLIP_VIT_L, PUBLISHED_V1

    name = "med-flamingo/med-flamingo"
    peer, vision, lm, tok = _peer(every=1, seed=6)
    (tmp_path / "med").mkdir()
    torch.save(peer.state_dict(), tmp_path / "med" / PUBLISHED_V1[name])
    vision.save_pretrained(tmp_path / "vision")
    tiny_image_processor("clip").save_pretrained(tmp_path / "vision")
    lm.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    cache = tmp_path / "hf" / "hub"
    for repo, files in ((name, "med"), (CLIP_VIT_L, "vision")):
        hub_cache_entry(cache, repo, tmp_path / files)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    argv = ["convert", "open-flamingo", "--model", name, "--lm", str(tmp_path / "llama"), "--out",
            str(tmp_path / "out")]
    code = f"from flamingo.cli import main; raise SystemExit(main({argv!r}))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    model, processor = load_pretrained(str(tmp_path / "out"))
    assert model.config.attend_next_image
    batch = processor(PROMPTS[0], images=MEDIA[0])
    with torch.no_grad():
        assert (model(**batch).logits - _peer_logits(peer, batch)).abs().max() <= 1e-5
