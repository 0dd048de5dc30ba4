"""The published OpenFlamingo checkpoints' LM families, loaded without remote code and equal to OpenFlamingo.

Each family is a tiny random model written in the layout its hub repository has (the remote code's config fields
and key names, its weight file format); `load_openflamingo_lm` reads it onto a transformers class (MosaicGPT, which
transformers lacks, onto ours: tests/test_mosaic_gpt.py pins its function), and a converted OpenFlamingo built on it
(OpenFlamingo's own modules, as in test_openflamingo_equal.py) gives the same logits.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MptConfig, MptForCausalLM

pytestmark = pytest.mark.peer
pytest.importorskip("einops_exts", reason="the OpenFlamingo peer needs einops-exts")
from flamingo import load_pretrained  # noqa: E402
from flamingo.convert import convert_openflamingo, load_openflamingo_lm  # noqa: E402
from flamingo.convert.lm_families import check_mpt  # noqa: E402
from flamingo.peers.openflamingo import build_openflamingo  # noqa: E402
from flamingo.tiny import random_image, tiny_image_processor, tiny_lm, tiny_tokenizer, tiny_vision  # noqa: E402

from helpers import hub_cache_entry, write_mosaic_gpt_layout  # noqa: E402

PADDED_VOCAB = 320  # the hub LMs pad their tables (50432 rows for a 50277-token tokenizer); OpenFlamingo cuts them
REMOTE_MPT_FIELDS = {  # what mosaicml/mpt-7b's config.json holds beyond transformers' MptConfig
    "architectures": ["MPTForCausalLM"], "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig",
                                                      "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
    "init_config": {"init_std": 0.02, "name": "kaiming_normal_"}, "tokenizer_name": "EleutherAI/gpt-neox-20b",
    "learned_pos_emb": True, "norm_type": "low_precision_layernorm", "verbose": 0}


def _mpt(seed: int = 0) -> MptForCausalLM:
    torch.manual_seed(seed)
    config = MptConfig(d_model=32, n_heads=4, n_layers=4, vocab_size=PADDED_VOCAB, max_seq_len=128)
    return MptForCausalLM(config).eval()


def write_mpt_7b_layout(lm: MptForCausalLM, directory, **attn) -> None:
    """MPT-7B's repository: transformers' key names, the remote code's config fields, .bin shards."""
    directory.mkdir()
    config = lm.config.to_dict()
    config.update(REMOTE_MPT_FIELDS)
    config["attn_config"] = {**config["attn_config"], "attn_impl": "torch", "qk_ln": False, "prefix_lm": False,
                             "attn_uses_sequence_id": False, **attn}
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    torch.save(state, directory / "pytorch_model-00001-of-00001.bin")


def _gpt_neox(seed: int = 0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           vocab_size=PADDED_VOCAB, max_position_embeddings=128, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config).eval()


def _mosaic_gpt():
    """MPT-1B's MosaicGPT: QK LayerNorm, random biases in every Linear and LayerNorm (flamingo.tiny)."""
    return tiny_lm("mosaic_gpt", vocab_size=PADDED_VOCAB, max_seq_len=128)


def _family(name: str, tmp_path):
    lm = {"gpt_neox": _gpt_neox, "mosaic_gpt": _mosaic_gpt}.get(name, _mpt)()
    directory = tmp_path / name
    if name == "mpt":
        write_mpt_7b_layout(lm, directory)
    elif name == "mosaic_gpt":
        write_mosaic_gpt_layout(lm, directory)
    else:
        lm.save_pretrained(directory)
    return lm, directory


@pytest.mark.parametrize("family", ["mosaic_gpt", "mpt", "gpt_neox"])
def test_family_loads_onto_a_shipped_class_and_equals_openflamingo(family, tmp_path):
    lm, directory = _family(family, tmp_path)
    loaded = load_openflamingo_lm(str(directory))
    shipped_by = "flamingo.model." if family == "mosaic_gpt" else "transformers.models."
    assert type(loaded).__module__.startswith(shipped_by)
    ids = torch.randint(0, PADDED_VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, lm(ids).logits, atol=1e-6)

    tok, vision = tiny_tokenizer(), tiny_vision("clip")
    peer, _ = build_openflamingo(copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                 cross_attn_every_n_layers=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in peer.lang_encoder.gated_cross_attn_layers:
            if layer is not None:
                layer.attn_gate.uniform_(0.3, 1.0)
                layer.ff_gate.uniform_(-1.0, -0.3)
    state = copy.deepcopy(peer.eval().state_dict())
    ours, processor = convert_openflamingo(state, copy.deepcopy(vision), str(directory), copy.deepcopy(tok),
                                           image_processor=tiny_image_processor("clip"))
    prompts = ["Intro <image>Question: what? Short answer: red.<|endofchunk|><image>Question: and?",
               "<image>A photo of a cat.<|endofchunk|>"]
    batch = processor(prompts, images=[[random_image(0), random_image(1)], [random_image(2)]], padding_side="right")
    with torch.no_grad():
        mine = ours(**batch).logits
        theirs = peer(vision_x=batch["images"].clone(), lang_x=batch["input_ids"],
                      attention_mask=batch["attention_mask"]).logits
    assert mine.shape == theirs.shape  # the table cut to OpenFlamingo's rows, as OpenFlamingo did
    real = batch["attention_mask"].bool()
    assert (mine[real] - theirs[real]).abs().max() <= 1e-5
    single = processor(prompts[1], images=[random_image(2)])
    ids = ours.generate(**single, max_new_tokens=3, min_new_tokens=3)  # generation takes it like any other model
    assert ids.shape == (1, single["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("option,reason", [
    ({"qk_ln": True}, "QK LayerNorm"), ({"prefix_lm": True}, "prefix-LM"),
    ({"alibi_bias_max": 4}, "alibi_bias_max 4"),  # transformers' slopes are for 8 whatever the config says
    ({"norm_type": "rmsnorm"}, "norm_type 'rmsnorm'"),  # RMSNorm weights fit its bias-less LayerNorm exactly
    ({"norm_type": "low_precision_rmsnorm"}, "norm_type 'low_precision_rmsnorm'"),
    ({"ffn_config": {"ffn_type": "mptmlp", "ffn_act_fn": {"name": "silu"}}}, "ffn_act_fn .*'silu'"),
    ({"ffn_config": {"ffn_act_fn": {"name": "gelu", "approximate": "tanh"}}}, "ffn_act_fn .*'tanh'"),
])
def test_what_transformers_mpt_cannot_compute_is_refused(option, reason, tmp_path):
    """transformers' MPT ignores these options silently; the loader says why it refuses instead."""
    attn = {k: v for k, v in option.items() if k not in ("norm_type", "ffn_config")}
    write_mpt_7b_layout(_mpt(), tmp_path / "lm", **attn)
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**config, **{k: v for k, v in option.items()
                                                                          if k not in attn}}))
    with pytest.raises(ValueError, match=reason):
        load_openflamingo_lm(str(tmp_path / "lm"))


def test_what_transformers_mpt_computes_is_accepted():
    """MPT-7B's own settings, written out or left to their defaults: LayerNorm (in low precision or not), exact
    GELU, ALiBi for 8."""
    for config in ({}, {"norm_type": "layernorm", "attn_config": {"alibi": True, "alibi_bias_max": 8},
                        "ffn_config": {"ffn_type": "mptmlp", "ffn_act_fn": {"name": "gelu", "approximate": "none"}}},
                   {"norm_type": "low_precision_layernorm", "ffn_config": {"ffn_act_fn": None}}):
        check_mpt(config, {})


def test_convert_command_takes_openflamingo_3b_layout_and_loads_back(tmp_path):
    from flamingo.cli import main

    lm, directory = _family("mosaic_gpt", tmp_path)
    tok, vision = tiny_tokenizer(), tiny_vision("clip")
    peer, _ = build_openflamingo(copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                 cross_attn_every_n_layers=1)
    with torch.no_grad():
        for layer in peer.lang_encoder.gated_cross_attn_layers:
            layer.attn_gate.fill_(0.6)
            layer.ff_gate.fill_(-0.4)
    trained = ("perceiver.", "lang_encoder.gated", "lang_encoder.transformer.wte.")  # as OpenFlamingo saves them
    torch.save({k: v for k, v in peer.state_dict().items() if k.startswith(trained)}, tmp_path / "checkpoint.pt")
    vision.save_pretrained(tmp_path / "vision")
    tiny_image_processor("clip").save_pretrained(tmp_path / "vision")
    tok.save_pretrained(directory)
    args = ["convert", "open-flamingo", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--vision",
            str(tmp_path / "vision"), "--lm", str(directory), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert (tmp_path / "out" / "lm" / "config.json").is_file()  # written whole (its table cut to the tokenizer)
    assert json.loads((tmp_path / "out" / "lm" / "config.json").read_text())["model_type"] == "mosaic_gpt"
    model, processor = load_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        batch = processor("<image>A photo of a cat.<|endofchunk|><image>two", images=[random_image(0), random_image(1)])
        mine = model(**batch).logits
        theirs = peer.eval()(vision_x=batch["images"].clone(), lang_x=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
    assert (mine - theirs).abs().max() <= 1e-5


def test_a_published_checkpoint_converts_by_its_hub_name(tmp_path, capsys):
    """`flamingo convert open-flamingo --model openflamingo/OpenFlamingo-3B-vitl-mpt1b`: the checkpoint, the vision
    tower and the LM (with its tokenizer) come from the hub under the names OpenFlamingo's README gives; here from a
    hub cache holding tiny stand-ins under those names, offline, in a fresh process."""
    from flamingo.cli import main
    from flamingo.convert import PUBLISHED

    name = "openflamingo/OpenFlamingo-3B-vitl-mpt1b"
    vision_name, lm_name = PUBLISHED[name]
    lm, tok, vision = _mosaic_gpt(), tiny_tokenizer(), tiny_vision("clip")
    for directory in ("vision", "lm", "of"):
        (tmp_path / directory).mkdir()
    vision.save_pretrained(tmp_path / "vision")
    tiny_image_processor("clip").save_pretrained(tmp_path / "vision")
    (tmp_path / "lm").rmdir()
    write_mosaic_gpt_layout(lm, tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    peer, _ = build_openflamingo(copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                 cross_attn_every_n_layers=1)
    with torch.no_grad():
        for layer in peer.lang_encoder.gated_cross_attn_layers:
            layer.attn_gate.uniform_(0.3, 1.0)
            layer.ff_gate.uniform_(-1.0, -0.3)
    torch.save(peer.state_dict(), tmp_path / "of" / "checkpoint.pt")  # the whole state, as `checkpoint.pt` has it
    cache = tmp_path / "hf" / "hub"
    for repo, files in ((name, "of"), (vision_name, "vision"), (lm_name, "lm")):
        hub_cache_entry(cache, repo, tmp_path / files)

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    argv = ["convert", "open-flamingo", "--model", name, "--out", str(tmp_path / "out")]
    code = f"from flamingo.cli import main; raise SystemExit(main({argv!r}))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    model, processor = load_pretrained(str(tmp_path / "out"))
    batch = processor("<image>A photo of a cat.<|endofchunk|><image>two", images=[random_image(0), random_image(1)])
    with torch.no_grad():
        mine = model(**batch).logits
        theirs = peer.eval()(vision_x=batch["images"].clone(), lang_x=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
    assert (mine - theirs).abs().max() <= 1e-5

    assert main(["convert", "open-flamingo", "--model", "openflamingo/OpenFlamingo-1B", "--out", "x"]) == 2
    assert main(["convert", "open-flamingo", "--checkpoint", "c.pt", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "not a published OpenFlamingo checkpoint" in err and "--checkpoint needs --vision and --lm" in err
