"""Conversions build their HF models without random init and read each tensor once (flamingo/convert/checkpoints.py):
no backbone weight is drawn at random on a real tensor, the converted model holds no meta tensor and owns its memory,
and its logits, parameters and buffers are those of the path it replaced (random init, then `load_state_dict`'s
copy: `bench.convert_memory.random_init_then_copy`). Peak memory itself is measured by bench/convert_memory.py."""

import json

import pytest
import torch
from test_idefics_equal import _inputs, _peer
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MptConfig, MptForCausalLM

from bench.convert_memory import random_init_then_copy
from flamingo.convert import from_idefics, load_openflamingo_lm
from flamingo.convert.checkpoints import meta_tensors
from flamingo.tiny import random_image


class RandomFills(TorchDispatchMode):
    """Counts the elements that random ops (`normal_`, `uniform_`, `randn`, ...) write into real, non-meta tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.Tag.nondeterministic_seeded in func.tags and isinstance(out, torch.Tensor) \
                and out.device.type != "meta":
            self.elements += out.numel()
        return out


def _backbone_elements(model) -> int:
    return sum(p.numel() for p in (*model.vision.parameters(), *model.lm.parameters()))


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for kind in ("named_parameters", "named_buffers"):
        mine, theirs = dict(getattr(a, kind)()), dict(getattr(b, kind)())
        assert mine.keys() == theirs.keys(), kind
        for name, tensor in mine.items():
            assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name


@pytest.fixture(scope="module")
def idefics_dir(tmp_path_factory):
    peer, tok = _peer("vector", True, seed=3)
    directory = tmp_path_factory.mktemp("idefics")
    peer.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_idefics_converts_without_random_init_to_what_the_copy_path_gave(idefics_dir, dtype):
    with RandomFills() as fills:
        ours, processor = from_idefics(str(idefics_dir), torch_dtype=dtype)
    # Only what constructors draw themselves before the parameter moves to the meta device (CLIP's class embedding,
    # the perceiver's latents): no weight matrix of the backbones.
    assert fills.elements < 0.01 * _backbone_elements(ours)
    assert meta_tensors(ours) == [] and {t.device.type for t in (*ours.parameters(), *ours.buffers())} == {"cpu"}
    assert {p.dtype for p in ours.parameters()} == {dtype or torch.float32}

    with RandomFills() as fills, random_init_then_copy():
        before, _ = from_idefics(str(idefics_dir), torch_dtype=dtype)
    assert fills.elements >= _backbone_elements(before)  # the bench's old path is the one with random init
    _same_tensors(ours, before)  # the rotary frequencies and position ids (in no checkpoint) included
    batch = _inputs(processor)
    if dtype is not None:
        batch["images"] = batch["images"].to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, before(**batch).logits)


def test_the_converted_model_owns_its_memory(idefics_dir, tmp_path):
    """Nothing maps the checkpoint's file once the conversion returned: rewriting it changes nothing."""
    import shutil

    directory = tmp_path / "copy"
    shutil.copytree(idefics_dir, directory)
    ours, processor = from_idefics(str(directory))
    batch = _inputs(processor)
    with torch.no_grad():
        expected = ours(**batch).logits
    weights = directory / "model.safetensors"
    weights.write_bytes(bytes(weights.stat().st_size))
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, expected)


def test_an_in_memory_idefics_shares_no_tensor_with_the_converted_model():
    peer, tok = _peer("float", False)
    with RandomFills() as fills:
        ours, _ = from_idefics(peer, tok)
    assert fills.elements < 0.01 * _backbone_elements(ours) and meta_tensors(ours) == []
    theirs = {p.untyped_storage().data_ptr() for p in peer.parameters()}
    assert not theirs & {p.untyped_storage().data_ptr() for p in ours.parameters()}


def _mpt_7b_dir(tmp_path, tied: bool):
    """An MPT-7B-layout LM: .bin weights without the head (the token embedding serves as both)."""
    torch.manual_seed(0)
    lm = MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=320, max_seq_len=128,
                                  tie_word_embeddings=tied)).eval()
    directory = tmp_path / "mpt"
    directory.mkdir()
    config = lm.config.to_dict()
    config.update(model_type="mpt", attn_config={**config["attn_config"], "attn_impl": "torch"})
    (directory / "config.json").write_text(json.dumps(config))
    torch.save({k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}, directory / "pytorch_model.bin")
    return directory


@pytest.mark.parametrize("tied", [True, False])
def test_a_bin_lm_whose_head_is_its_embedding_loads_without_random_init(tmp_path, tied):
    directory = _mpt_7b_dir(tmp_path, tied)
    with RandomFills() as fills:
        lm = load_openflamingo_lm(str(directory))
    assert fills.elements == 0 and meta_tensors(lm) == []
    head, table = lm.lm_head.weight, lm.transformer.wte.weight
    if tied:
        assert head is table  # tied again after the tensors were assigned
    else:  # one tensor read for both: each parameter gets its own, as a copy into a built model did
        assert head is not table and head.untyped_storage().data_ptr() != table.untyped_storage().data_ptr()
    with random_init_then_copy():
        before = load_openflamingo_lm(str(directory))
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, before(ids).logits)
    _same_tensors(lm, before)


@pytest.mark.peer
@pytest.mark.parametrize("lm", ["llama", "mpt"])
def test_otter_converts_without_random_init_of_its_backbones(tmp_path, monkeypatch, lm):
    """Otter's backbones are built on the meta device; its perceiver and blocks are built by `convert_openflamingo`
    (at random, then loaded), in the conversion's dtype."""
    pytest.importorskip("otter_ai.models.otter.modeling_otter", reason="otter-ai is not installed")
    from test_otter_equal import PROMPTS, _reference

    from flamingo.convert import from_otter

    _, directory, tok_dir = _reference(tmp_path, monkeypatch, lm, 2)
    for dtype in (None, torch.bfloat16):
        with RandomFills() as fills:
            ours, processor = from_otter(directory, tokenizer=tok_dir, torch_dtype=dtype)
        trained = sum(p.numel() for p in (*ours.resampler.parameters(), *ours.xattn.parameters()))
        assert fills.elements < trained + 0.01 * _backbone_elements(ours) and meta_tensors(ours) == []
        assert {p.dtype for p in ours.parameters()} == {dtype or torch.float32}
        with random_init_then_copy():
            before, _ = from_otter(directory, tokenizer=tok_dir, torch_dtype=dtype)
        _same_tensors(ours, before)
        batch = processor(PROMPTS[1:], images=[[random_image(2)]])
        batch["images"] = batch["images"].to(dtype or torch.float32)
        with torch.no_grad():
            assert torch.equal(ours(**batch).logits, before(**batch).logits)
