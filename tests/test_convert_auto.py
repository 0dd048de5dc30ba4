"""`--model` takes any checkpoint the converters read (flamingo/convert/auto.py): a model saved here, an IDEFICS
directory or its PEFT adapter, an Otter repository, a published OpenFlamingo name; the foreign ones are converted in
memory, computing what `flamingo convert` would save."""

import json

import pytest
import torch
from test_idefics_equal import _inputs, _peer  # noqa: E402

from flamingo.convert import from_idefics
from flamingo.convert.auto import checkpoint_format, load_model
from flamingo.model.quantize import quantized_mode
from flamingo.tiny import random_image

from helpers import chat_run_config  # noqa: E402


@pytest.fixture(scope="module")
def idefics_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics")
    peer, tok = _peer("vector", True)
    peer.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_formats_are_told_apart(tmp_path, idefics_dir):
    from flamingo.convert.openflamingo import PUBLISHED
    from flamingo.tiny import tiny_flamingo

    model, processor = tiny_flamingo()
    model.save_pretrained(str(tmp_path / "ours"), processor=processor)
    assert checkpoint_format(str(tmp_path / "ours")) == "flamingo"
    assert checkpoint_format(str(idefics_dir)) == "idefics"
    for model_type in ("otter", "flamingo"):  # Otter's, and its project's HF-format OpenFlamingo
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert checkpoint_format(str(tmp_path / model_type)) == "otter"
    assert checkpoint_format(next(iter(PUBLISHED))) == "open-flamingo"  # by name, before any download
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type: 'llama'"):
        checkpoint_format(str(tmp_path / "llama"))
    with pytest.raises(ValueError, match="--lm"):
        checkpoint_format("med-flamingo/med-flamingo")
    with pytest.raises(FileNotFoundError):
        checkpoint_format(str(tmp_path / "missing"))


def test_an_idefics_directory_loads_as_its_conversion(idefics_dir):
    ours, processor = load_model(str(idefics_dir))
    converted, _ = from_idefics(str(idefics_dir))
    batch = _inputs(processor)
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, converted(**batch).logits)
    from flamingo.serve.server import build_engine

    engine = build_engine(str(idefics_dir), max_batch=2)  # `flamingo serve` / `flamingo batch`
    assert engine.processor.template == "idefics"
    with torch.no_grad():
        assert torch.equal(engine.model(**batch).logits, converted(**batch).logits)
    half, _ = load_model(str(idefics_dir), torch_dtype=torch.bfloat16)
    assert half.lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.equal(half.lm.model.rotary_emb.inv_freq, converted.lm.model.rotary_emb.inv_freq)  # float32, as HF's
    pytest.importorskip("torchao", reason="int8 frozen weights need torchao")
    int8, _ = load_model(str(idefics_dir), quantize_frozen="int8")
    assert quantized_mode(int8) == "int8"


def test_generate_command_takes_an_idefics_directory(idefics_dir, tmp_path, capsys):
    from flamingo.cli import main

    random_image(2).save(tmp_path / "a.png")
    prompt = "User:<image>What is in this image?<end_of_utterance>\nAssistant:"
    assert main(["generate", "--model", str(idefics_dir), "--image", str(tmp_path / "a.png"), "--max-new-tokens",
                 "5", "--prompt", prompt]) == 0
    ours, processor = from_idefics(str(idefics_dir))
    batch = processor(prompt, images=[str(tmp_path / "a.png")])
    expected = ours.generate(**batch, max_new_tokens=5)[0, batch["input_ids"].shape[1]:]
    assert capsys.readouterr().out.rstrip("\n") == processor.decode(expected)


def test_training_starts_from_an_idefics_directory(idefics_dir, tmp_path):
    """`model.init_from` names an IDEFICS checkpoint: converted as it loads, then tuned on conversations written in
    IDEFICS's dialogue format; the blocks train, the LM stays, and the run saves a model of ours."""

    from flamingo import load_pretrained
    from flamingo.train.config import load_config
    from flamingo.train.trainer import Trainer

    path = chat_run_config(tmp_path, str(idefics_dir), steps=2)
    trainer = Trainer(load_config(str(path)))
    assert trainer.processor.template == "idefics"
    batch = next(iter(trainer.sources["chat"]))
    assert "User:" in trainer.processor.tokenizer.decode(batch["input_ids"][0])
    lm_before = {n: p.detach().clone() for n, p in trainer.model.lm.named_parameters()}
    blocks_before = [p.detach().clone() for p in trainer.model.xattn.parameters()]
    out = trainer.run()
    assert all(torch.equal(p, lm_before[n]) for n, p in trainer.model.lm.named_parameters())
    assert any(not torch.equal(p, b) for p, b in zip(trainer.model.xattn.parameters(), blocks_before))
    tuned, processor = load_pretrained(out)
    assert processor.template == "idefics" and tuned.config.block == "idefics"


def test_init_from_takes_the_options_that_apply_to_a_trained_model(idefics_dir, tmp_path):
    """With `model.init_from`, `model.flamingo` may set LoRA adapters on the LM and the frozen weights' format; an
    option that shapes a new model is refused, never ignored."""
    from flamingo.train.config import parse_config
    from flamingo.train.trainer import build_model

    def config(**flamingo):
        return parse_config({"model": {"init_from": str(idefics_dir), "flamingo": flamingo},
                             "data": [{"name": "d", "kind": "chat", "path": "unused.jsonl", "batch_size": 1}],
                             "train": {"steps": 1, "output_dir": str(tmp_path / "run")}})

    pytest.importorskip("peft", reason="lm_lora needs peft")
    model, _ = build_model(config(lm_lora={"r": 2}, quantize_frozen="int8"))
    assert model.config.lm_lora["r"] == 2 and any(".lora_A" in n for n, _ in model.lm.named_parameters())
    assert model.config.quantize_frozen == "int8"  # (the Trainer quantizes on its device)
    with pytest.raises(ValueError, match="xattn_every"):
        build_model(config(xattn_every=2))


def test_a_checkpoint_saved_quantized_is_refused_by_name(idefics_dir, tmp_path):
    """bitsandbytes / GPTQ checkpoints hold packed integers, not weights: refused before any tensor is read."""
    import shutil

    shutil.copytree(idefics_dir, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="saved quantized \\(bitsandbytes\\)"):
        from_idefics(str(tmp_path / "q"))
