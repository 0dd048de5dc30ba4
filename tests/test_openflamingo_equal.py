"""Equal to OpenFlamingo: the same backbones and weights (through our converter) give the same logits.

OpenFlamingo 2.0.1 is installed with `pip install --no-deps open-flamingo==2.0.1 einops einops-exts` and imported,
never copied (flamingo/peers/openflamingo.py loads its model modules without its open_clip-importing __init__).
"""

import copy

import pytest
import torch

pytestmark = pytest.mark.peer
pytest.importorskip("einops_exts", reason="the OpenFlamingo peer needs einops-exts")
from flamingo.convert import convert_openflamingo, load_openflamingo_state  # noqa: E402
from flamingo.tiny import random_image, tiny_image_processor  # noqa: E402

from helpers import openflamingo_peer, write_openflamingo_files  # noqa: E402

PROMPTS = ["Intro <image>Question: what? Short answer: red.<|endofchunk|><image>Question: and? Short answer: two."
           "<|endofchunk|><image>Question: this?",
           "<image>A photo of a cat.<|endofchunk|>"]


def _peer(every: int, seed: int = 0, lm_kind: str = "llama"):
    return openflamingo_peer(every, seed, lm_kind)


def _inputs(processor):
    media = [[random_image(0), random_image(1), random_image(2)], [random_image(3)]]
    return processor(PROMPTS, images=media, padding_side="right")


def _peer_logits(peer, batch):
    images = batch["images"].clone()  # OpenFlamingo encodes every media slot, padded ones too
    with torch.no_grad():
        return peer(vision_x=images, lang_x=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("every", [1, 2])
def test_logits_equal_openflamingo(every):
    peer, vision, lm, tok = _peer(every)
    state = copy.deepcopy(peer.state_dict())  # the full model state, lm_head included
    ours, processor = convert_openflamingo(state, copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                           image_processor=tiny_image_processor("clip"))
    assert ours.xattn_layer_indices == [i for i in range(4) if (i + 1) % every == 0]
    given = {t.untyped_storage().data_ptr() for t in state.values()}  # the model owns its tensors
    assert not given & {p.untyped_storage().data_ptr() for p in ours.parameters()}
    batch = _inputs(processor)
    assert batch["images"].shape[:2] == (2, 3) and batch["num_media"].tolist() == [3, 1]
    with torch.no_grad():
        mine = ours(**batch).logits
    theirs = _peer_logits(peer, batch)
    real = batch["attention_mask"].bool()
    assert (mine[real] - theirs[real]).abs().max() <= 1e-5
    # Not vacuous: the images matter to both, and the gates are open.
    other = {**batch, "images": torch.randn_like(batch["images"])}
    with torch.no_grad():
        assert not torch.allclose(ours(**other).logits[real], mine[real])


def test_an_untied_head_bias_converts_with_its_added_rows():
    """Phi's untied head has a bias. A whole `state_dict()` holds its added rows (trained, or OpenFlamingo's resize
    init: the mean bias, non-zero for a real Phi), which convert too: every logit is OpenFlamingo's, the added tokens'
    included. The head's base rows must be the given LM's."""
    peer, vision, lm, tok = _peer(2, lm_kind="phi")
    torch.manual_seed(7)
    with torch.no_grad():  # non-zero biases, as a real Phi's; other values in the added rows
        bias = torch.randn_like(lm.lm_head.bias)
        lm.lm_head.bias.copy_(bias)
        theirs = peer.lang_encoder.lm_head.bias
        theirs[: bias.shape[0]] = bias
        theirs[bias.shape[0]:] = torch.randn(theirs.shape[0] - bias.shape[0])
    state = copy.deepcopy(peer.state_dict())
    ours, processor = convert_openflamingo(state, copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                           image_processor=tiny_image_processor("clip"))
    first = ours.config.first_new_token_id
    assert torch.equal(ours.new_lm_head_bias.detach(), theirs[first:])
    batch = _inputs(processor)
    with torch.no_grad():
        mine = ours(**batch).logits
    real = batch["attention_mask"].bool()
    assert (mine[real] - _peer_logits(peer, batch)[real]).abs().max() <= 1e-5

    other = copy.deepcopy(lm)  # another LM's head bias
    with torch.no_grad():
        other.lm_head.bias.add_(1.0)
    with pytest.raises(ValueError, match="differ from the given LM's \\('lang_encoder.lm_head.bias'"):
        convert_openflamingo(state, copy.deepcopy(vision), other, copy.deepcopy(tok),
                             image_processor=tiny_image_processor("clip"))


def test_released_style_checkpoint_file_converts_to_equal_logits(tmp_path):
    """A checkpoint.pt as OpenFlamingo releases them: trained tensors only, blocks under the wrapped decoder layers,
    read with torch.load(weights_only=True). OpenFlamingo's untied head rows for the added tokens are not in such a
    file (they stay at their random resize init), so the base-vocabulary logits are compared."""
    peer, vision, lm, tok = _peer(2, seed=3)
    layers_prefix = "lang_encoder.model.layers."
    released = {k: v.clone() for k, v in peer.state_dict().items()
                if k.startswith("perceiver.") or k == "lang_encoder.model.embed_tokens.weight"
                or (k.startswith(layers_prefix) and ".gated_cross_attn_layer." in k)}
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in released.items()}}, path)
    ours, processor = convert_openflamingo(str(path), copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                           image_processor=tiny_image_processor("clip"))
    assert ours.config.extra_saved_weights == ["lm.model.embed_tokens.weight"]
    legacy = tmp_path / "legacy.pt"  # torch's pre-1.6 format cannot be memory-mapped: it is read whole
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in released.items()}}, legacy,
               _use_new_zipfile_serialization=False)
    mapped, whole = load_openflamingo_state(str(path)), load_openflamingo_state(str(legacy))
    assert mapped.keys() == whole.keys() and all(torch.equal(mapped[k], whole[k]) for k in mapped)
    batch = _inputs(processor)
    with torch.no_grad():
        mine = ours(**batch).logits
    theirs = _peer_logits(peer, batch)
    real, base = batch["attention_mask"].bool(), ours.config.first_new_token_id
    assert (mine[real][:, :base] - theirs[real][:, :base]).abs().max() <= 1e-5

    # The converted model survives a trained-only round trip with its fine-tuned embedding rows.
    backbones = tmp_path / "backbones"
    ours.vision.save_pretrained(backbones / "vision")
    processor.image_processor.save_pretrained(backbones / "vision")
    ours.config.vision_name_or_path = str(backbones / "vision")
    lm_dir = backbones / "lm"
    copy.deepcopy(lm).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    ours.config.lm_name_or_path = str(lm_dir)
    ours.save_pretrained(str(tmp_path / "converted"), trained_only=True, processor=processor)
    from flamingo import load_pretrained

    loaded, _ = load_pretrained(str(tmp_path / "converted"))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, mine)


def test_convert_command_writes_a_trained_only_model_and_refuses_a_missing_file(tmp_path):
    from flamingo.cli import main

    args = ["convert", "open-flamingo", *write_openflamingo_files(*_peer(1, seed=5), tmp_path), "--out",
            str(tmp_path / "out"), "--trained-only"]
    assert main(args) == 0
    assert (tmp_path / "out" / "flamingo.safetensors").is_file() and not (tmp_path / "out" / "lm").exists()
    assert main(["convert", "open-flamingo", "--checkpoint", str(tmp_path / "missing.pt"), "--vision", "v",
                 "--lm", "l", "--out", str(tmp_path / "x")]) == 2
