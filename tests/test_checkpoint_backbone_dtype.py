"""A trained-only save records the dtype its backbones ran in (`train.frozen_dtype: bf16`: bf16) in its weights
file's metadata, so that loading it gives the backbones that dtype, as a whole save's own config.json does; a
`torch_dtype=` given at load wins, and a save without the record loads as it always did (float32 backbones)."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flamingo import from_backbones, load_pretrained
from flamingo.config import WEIGHTS_NAME
from flamingo.model.flamingo import BACKBONE_DTYPES_KEY
from flamingo.model.quantize import cast_frozen
from flamingo.tiny import (
    random_image,
    set_gates,
    tiny_flamingo_config,
    tiny_image_processor,
    tiny_lm,
    tiny_tokenizer,
    tiny_vision,
)
from flamingo.train.config import load_config
from flamingo.train.trainer import Trainer

from train_fixtures import train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _parts(model) -> dict[str, set]:
    return {name: {p.dtype for p in module.parameters()} for name, module in
            (("vision", model.vision), ("lm", model.lm), ("resampler", model.resampler), ("xattn", model.xattn))}


def _logits(model, processor) -> torch.Tensor:
    batch = processor("<image>Question: what colour? Short answer:", images=[random_image(0)])
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A float32 model on float32 backbones saved here, its frozen weights then stored in bf16 (what
    `train.frozen_dtype: bf16` does), saved trained-only: (model, processor, save directory)."""
    root = tmp_path_factory.mktemp("frozen_bf16")
    tok = tiny_tokenizer()
    tiny_lm("llama", vocab_size=len(tok)).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    tiny_vision("clip").save_pretrained(root / "vision")
    tiny_image_processor("clip").save_pretrained(root / "vision")
    model, processor = from_backbones(str(root / "vision"), str(root / "lm"),
                                      config=tiny_flamingo_config(lm_lora={"r": 2}))
    set_gates(model, 0.9)
    cast_frozen(model, torch.bfloat16)
    model.eval()
    model.save_pretrained(str(root / "trained"), trained_only=True, processor=processor)
    return model, processor, root / "trained"


def test_a_trained_only_save_loads_its_backbones_in_the_dtype_they_ran_in(bf16_run):
    model, processor, saved = bf16_run
    assert _parts(model) == {"vision": {torch.bfloat16}, "lm": {torch.bfloat16, torch.float32},  # (the adapters)
                             "resampler": {torch.float32}, "xattn": {torch.float32}}
    with safe_open(str(saved / WEIGHTS_NAME), "pt") as f:
        assert json.loads(f.metadata()[BACKBONE_DTYPES_KEY]) == {"vision": "bfloat16", "lm": "bfloat16"}
    loaded, loaded_processor = load_pretrained(str(saved))
    assert _parts(loaded) == _parts(model)
    assert torch.equal(_logits(loaded, loaded_processor), _logits(model, processor))


def test_a_dtype_given_at_load_wins(bf16_run):
    _, _, saved = bf16_run
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        loaded, _ = load_pretrained(str(saved), torch_dtype=name)
        assert {d for ds in _parts(loaded).values() for d in ds} == {dtype}


@pytest.mark.parametrize("record", (None, "not json", json.dumps({"lm": "int8", "vision": "no_such_dtype"})))
def test_a_save_without_a_usable_record_loads_its_backbones_as_before(bf16_run, tmp_path, record):
    """Written before the record (or with one this version cannot read): the backbones load in the trained
    tensors' float32, as such saves always did."""
    _, _, saved = bf16_run
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    metadata = {"format": "pt", **({} if record is None else {BACKBONE_DTYPES_KEY: record})}
    save_file(load_file(str(copy / WEIGHTS_NAME)), str(copy / WEIGHTS_NAME), metadata=metadata)
    loaded, _ = load_pretrained(str(copy))
    assert {d for ds in _parts(loaded).values() for d in ds} == {torch.float32}


def test_a_whole_save_writes_no_record(bf16_run, tmp_path):
    model, processor, _ = bf16_run
    model.save_pretrained(str(tmp_path / "whole"), processor=processor)
    with safe_open(str(tmp_path / "whole" / WEIGHTS_NAME), "pt") as f:
        assert BACKBONE_DTYPES_KEY not in (f.metadata() or {})
    assert _parts(load_pretrained(str(tmp_path / "whole"))[0]) == _parts(model)


def test_the_trained_only_final_of_a_frozen_bf16_run_loads_as_the_run_held_it(world, tmp_path):
    root, vision, lm, data = world
    config = load_config(train_config(root, vision, lm, data, steps=1, out=str(tmp_path / "run"), precision="bf16",
                                      frozen_dtype="bf16", progress=False, save_trained_only=True))
    trainer = Trainer(config)
    loaded, _ = load_pretrained(trainer.run())
    assert _parts(loaded) == _parts(trainer.model)
    assert {d for part in ("vision", "lm") for d in _parts(loaded)[part]} == {torch.bfloat16}
