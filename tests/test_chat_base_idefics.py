"""A base IDEFICS model (idefics-9b, idefics-80b: its tokenizer holds `<end_of_utterance>`, its embedding has no row
for it) in its chat format everywhere: `flamingo eval --chat` and chat training data end turns with the line break
alone, as the server does (docs/serve.md, "idefics"), so no prompt or sample holds a token the model has no row for."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import IdeficsConfig, IdeficsForVisionText2Text

from flamingo.chat import Turn, chat_format_for
from flamingo.config import END_OF_UTTERANCE, IDEFICS_IMAGE_WRAPPER
from flamingo.convert import from_idefics
from flamingo.convert.idefics import idefics_image_processor
from flamingo.data.sources import read_records
from flamingo.eval import evaluate
from flamingo.eval.predict import build_prompt
from flamingo.tiny import random_image, tiny_tokenizer
from flamingo.train.config import load_config
from flamingo.train.trainer import Trainer

from helpers import make_classification, make_vqa

pytestmark = pytest.mark.usefixtures("one_thread")


def _base_idefics():
    """A tiny IDEFICS whose decoupled rows hold the wrapper and `<image>` only (`additional_vocab_size=2`), as the
    base models' embeddings: the tokenizer's `<end_of_utterance>` is one past the model's last row."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IDEFICS_IMAGE_WRAPPER, "<image>", END_OF_UTTERANCE]})
    tok.pad_token = tok.eos_token
    config = IdeficsConfig(
        vocab_size=len(tok) - 3,
        additional_vocab_size=2,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        cross_layer_interval=1,
        use_resampler=True,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        max_position_embeddings=256,
        vision_config=dict(
            embed_dim=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        ),
        perceiver_config=dict(
            use_resampler=True, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=4, resampler_head_dim=8
        ),
    )
    torch.manual_seed(0)
    model, processor = from_idefics(
        IdeficsForVisionText2Text(config).eval(), tok, image_processor=idefics_image_processor(32)
    )
    vocab = model.lm.get_output_embeddings().weight.shape[0]
    assert tok.convert_tokens_to_ids(END_OF_UTTERANCE) == vocab  # no row for it
    return model, processor, vocab


@pytest.mark.parametrize("task, maker", [("vqa", make_vqa), ("classification", make_classification)])
def test_eval_chat_prompts_and_candidates_end_turns_as_served(task, maker, tmp_path, monkeypatch):
    import flamingo.eval.runner as runner

    model, processor, vocab = _base_idefics()
    prompts = []

    def spy(*args, **kwargs):
        prompts.append(build_prompt(*args, **kwargs)[0])
        return build_prompt(*args, **kwargs)

    monkeypatch.setattr(runner, "build_prompt", spy)
    out = evaluate(
        model,
        processor,
        task,
        str(maker(tmp_path / "data")),
        out_dir=str(tmp_path / "out"),
        chat=True,
        shots=[2],
        trials=1,
        batch_size=2,
        progress=False,
        generation={"max_new_tokens": 3},
    )
    assert out["settings"]["chat"] == "idefics" and out["runs"][0]["metrics"]
    assert prompts and all(p.endswith("\nAssistant:") and p.count("User:") == 3 for p in prompts)
    assert not any(END_OF_UTTERANCE in p for p in prompts)
    assert chat_format_for(processor, vocab).render([Turn("user", ("q",))]) == "User: q\nAssistant:"


def test_chat_training_data_is_written_as_the_model_is_served(tmp_path):
    """The trainer builds its sources for its model: a chat sample is the server's prompt, the answer and the line
    break, its ids all rows of the model's embedding, and the model trains on it."""
    model, processor, vocab = _base_idefics()
    random_image(0, size=32).save(tmp_path / "0.png")
    row = {
        "image": "0.png",
        "conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A cat."}],
    }
    (tmp_path / "chat.jsonl").write_text(json.dumps(row) + "\n")
    config = {
        "model": {"vision": "unused", "lm": "unused"},
        "data": [
            {
                "name": "c",
                "kind": "chat",
                "path": str(tmp_path / "chat.jsonl"),
                "batch_size": 1,
                "options": {"shuffle": False},
            }
        ],
        "train": {"steps": 1, "output_dir": str(tmp_path / "run"), "save_every": 0},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    trainer = Trainer(load_config(str(tmp_path / "c.yaml")), model=model, processor=processor)
    spec = trainer.sources["c"].spec
    served = chat_format_for(processor, vocab).render([Turn("user", ("<image>", "What?"))])
    (record,) = read_records(str(tmp_path / "chat.jsonl"))
    sample = spec.encode(record)
    assert sample.text == served + " A cat.\n" and max(sample.input_ids) < vocab
    assert trainer.train_step()["loss"] > 0
