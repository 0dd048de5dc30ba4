"""Fixtures for the training tests: tiny backbones saved as HF directories, a pairs + interleaved dataset on disk,
and a training config. Shared by tests/test_train.py and the torchrun worker tests/ddp_worker.py."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import yaml
from PIL import Image

from flamingo.tiny import tiny_image_processor, tiny_lm, tiny_tokenizer, tiny_vision

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def save_backbones(root: str) -> tuple[str, str]:
    """A tiny CLIP tower (+ image processor) and a tiny Llama (+ tokenizer) saved for `from_pretrained`."""
    vision_dir, lm_dir = os.path.join(root, "vision"), os.path.join(root, "lm")
    tiny_vision("clip").save_pretrained(vision_dir)
    tiny_image_processor("clip").save_pretrained(vision_dir)
    tok = tiny_tokenizer()
    tiny_lm("llama", vocab_size=len(tok)).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    return vision_dir, lm_dir


def _image(colour: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.array(COLOURS[colour], dtype=np.int16) + rng.integers(-20, 20, (32, 32, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_datasets(root: str, n_pairs: int = 48, n_docs: int = 24, same_caption: bool = False) -> dict[str, str]:
    """Pairs JSONL (caption names the image's colour) and MMC4-style interleaved JSONL, images as PNG files.

    same_caption: every pair has the same caption (equal token counts per sample and equal batch shapes across
    ranks).
    """
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names = list(COLOURS)
    with open(os.path.join(root, "pairs.jsonl"), "w") as f:
        for i in range(n_pairs):
            colour = names[i % len(names)]
            _image(colour, i).save(os.path.join(root, "images", f"p{i}.png"))
            caption = "a red circle." if same_caption else f"a {colour} square."
            f.write(json.dumps({"image": f"images/p{i}.png", "caption": caption}) + "\n")
    with open(os.path.join(root, "docs.jsonl"), "w") as f:
        for i in range(n_docs):
            colours = [names[(i + k) % len(names)] for k in range(2)]
            for k, c in enumerate(colours):
                _image(c, 1000 + 2 * i + k).save(os.path.join(root, "images", f"d{i}_{k}.png"))
            text = ["A page about shapes.", f"This one is {colours[0]}.", "It is a square.",
                    f"The next one is {colours[1]}."]
            sims = [[0.1, 0.95, 0.2, 0.1], [0.1, 0.2, 0.1, 0.95]]
            f.write(json.dumps({"text_list": text, "similarity_matrix": sims, "image_info": [
                {"image_name": f"d{i}_{k}.png", "matched_text_index": 1 + 2 * k, "matched_sim": 0.95}
                for k in range(2)]}) + "\n")
    return {"pairs": os.path.join(root, "pairs.jsonl"), "interleaved": os.path.join(root, "docs.jsonl")}


def train_config(root: str, vision: str, lm: str, data: dict[str, str], *, steps: int, out: str,
                 batch_size: int = 4, interleaved: bool = True, lr: float = 1e-3, **train: Any) -> str:
    """A YAML config for a tiny run; returns its path."""
    datasets = [{"name": "pairs", "kind": "pairs", "path": data["pairs"], "batch_size": batch_size,
                 "loss_weight": 1.0, "options": {"max_tokens": 32, "shuffle_buffer": 8}}]
    if interleaved:
        datasets.append({"name": "interleaved", "kind": "interleaved", "path": data["interleaved"],
                         "batch_size": 2, "loss_weight": 0.5,
                         "options": {"max_images": 2, "max_tokens": 64, "shuffle_buffer": 4,
                                     "image_dir": os.path.dirname(data["pairs"]) + "/images"}})
    config = {
        "model": {"vision": vision, "lm": lm, "flamingo": dict(
            xattn_heads=4, xattn_head_dim=8, resampler_heads=4, resampler_head_dim=8, num_latents=8,
            resampler_depth=2, max_frames=4)},
        "data": datasets,
        "optim": {"lr": lr},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": {"steps": steps, "output_dir": out, "seed": 0, "save_every": 5, "log_every": 1, **train},
    }
    path = os.path.join(root, f"config-{os.path.basename(out)}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def nan_losses_after_the_first_step(trainer: Any, monkeypatch: Any, from_forward: int = 2) -> None:
    """From the trainer's second forward on (`from_forward`: from that one; 1: every loss), every loss is NaN (by
    default the first step trains normally)."""
    real_forward = trainer.model.forward
    calls = {"n": 0}

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = real_forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= from_forward:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", forward)
