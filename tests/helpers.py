"""Test-only helpers shared by several test files: the plain, uncached computations that the fast paths are checked
against, and the tiny fixture datasets of every evaluation task (the layouts of docs/eval.md)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flamingo import Flamingo
from flamingo.tiny import random_image


def openflamingo_peer(every: int, seed: int = 0, lm_kind: str = "llama", *, v1: bool = False,
                      attn_gates: tuple[float, float] = (0.3, 1.0), modules: Any = None) -> tuple[Any, Any, Any, Any]:
    """(OpenFlamingo peer, vision tower, LM, tokenizer) on tiny random backbones (the peer holds copies): its gates
    open and its embedding table perturbed (OpenFlamingo trains it all). v1: OpenFlamingo 0.0.2's classes; modules:
    another copy of them (Multimodal-GPT's)."""
    import copy

    from flamingo.peers.openflamingo import build_openflamingo
    from flamingo.tiny import tiny_lm, tiny_tokenizer, tiny_vision

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    lm, vision = tiny_lm(lm_kind, vocab_size=len(tok), seed=seed), tiny_vision("clip", seed=seed)
    peer, _ = build_openflamingo(copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                 cross_attn_every_n_layers=every, v1=v1, modules=modules)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for layer in peer.lang_encoder.gated_cross_attn_layers:
            if layer is not None:
                layer.attn_gate.uniform_(*attn_gates)
                layer.ff_gate.uniform_(-1.0, -0.3)
        table = peer.lang_encoder.get_input_embeddings().weight
        table.add_(0.01 * torch.randn_like(table))
    return peer.eval(), vision, lm, tok


def interrupted_at(fn: Any, call: int) -> Any:
    """`fn` that raises KeyboardInterrupt at its `call`-th call (a Ctrl-C half way through a loop of them)."""
    calls = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped


def unhooked_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a Flamingo's LM (or tower) without the hooks the model put on it: the LM as another model may
    take it (a Flamingo refuses an LM another one hooks)."""
    copied = copy.deepcopy(module)
    for m in copied.modules():
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    return copied


def chat_run_config(tmp_path: Path, init_from: str, steps: int) -> Path:
    """A training config starting from `init_from` on four LLaVA-style conversations (`What colour is it?` about
    four images): the run `model.init_from` tests make. Returns the YAML's path."""
    import yaml

    (tmp_path / "img").mkdir()
    rows = []
    for k in range(4):
        random_image(k).save(tmp_path / "img" / f"{k}.png")
        rows.append({"image": f"img/{k}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"Colour {k}."}]})
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": {"init_from": init_from},
              "data": [{"name": "chat", "kind": "chat", "path": str(tmp_path / "chat.jsonl"), "batch_size": 2,
                        "options": {"shuffle": False}}],
              "optim": {"lr": 1e-2}, "schedule": {"kind": "constant", "warmup_steps": 0},
              "train": {"steps": steps, "output_dir": str(tmp_path / "run"), "seed": 0, "save_every": steps,
                        "log_every": 1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "config.yaml"


def continuous_batch_greedy(model: Flamingo, processor: Any, prompts: Sequence[tuple[str, list]], steps: int,
                            chunk: int = 3) -> list[list[int]]:
    """The server's path for several prompts at once: each prefilled in chunks of `chunk` tokens (`Prefill`), then
    `steps` greedy tokens each from one `DecodeBatch` holding them all (`<image>` suppressed, as the server does)."""
    from flamingo.model.batching import DecodeBatch
    from flamingo.model.prefill import Prefill

    suppress = model.config.media_token_id
    batch, rows = DecodeBatch(model, len(prompts)), []
    for prompt, media in prompts:
        b = processor(prompt, images=media or None)
        prefill, row = Prefill(model, b["input_ids"][0], b.get("images"), b.get("num_media"), b.get("num_frames"),
                               chunk=chunk), None
        while row is None:
            row = prefill.step()
        batch.add(row)
        logits = row.logits.clone()
        logits[suppress] = -float("inf")
        rows.append([int(logits.argmax())])
    for _ in range(steps - 1):
        logits = batch.step(torch.tensor([r[-1] for r in rows]))
        logits[:, suppress] = -float("inf")
        for r, t in zip(rows, logits.argmax(-1).tolist()):
            r.append(t)
    return rows


def write_openflamingo_files(peer: Any, vision: Any, lm: Any, tok: Any, directory: Path,
                             name: str = "checkpoint.pt") -> list[str]:
    """A released-style checkpoint file of the peer (its perceiver, blocks and LM input table) and its backbones as
    directories, as `flamingo convert open-flamingo` takes them: the command's `--checkpoint F --vision V --lm L`
    arguments."""
    from flamingo.tiny import tiny_image_processor

    table = peer.lang_encoder.get_input_embeddings().weight
    table_key = next(f"lang_encoder.{n}" for n, p in peer.lang_encoder.named_parameters() if p is table)
    torch.save({k: v for k, v in peer.state_dict().items()
                if k.startswith(("perceiver.", "lang_encoder.gated")) or k == table_key}, directory / name)
    vision.save_pretrained(directory / "vision")
    tiny_image_processor("clip").save_pretrained(directory / "vision")
    lm.save_pretrained(directory / "lm")
    tok.save_pretrained(directory / "lm")
    return ["--checkpoint", str(directory / name), "--vision", str(directory / "vision"), "--lm",
            str(directory / "lm")]


def tiny_otter_shaped(gates: float = 0.5) -> tuple[Flamingo, Any]:
    """A tiny model with Otter's tokens (`<answer>` added after `<image>`) and its chat format (template `otter`)."""
    from flamingo.build import from_backbones
    from flamingo.tiny import (
        set_gates,
        tiny_flamingo_config,
        tiny_image_processor,
        tiny_lm,
        tiny_tokenizer,
        tiny_vision,
    )

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model, processor = from_backbones(tiny_vision(), tiny_lm(vocab_size=len(tok)), tok, tiny_flamingo_config(),
                                      image_processor=tiny_image_processor(), extra_tokens=("<answer>",),
                                      template="otter")
    set_gates(model, gates)
    return model.eval(), processor


# --------------------------------------------------------------------------------------------------- hub layouts
MOSAIC_GPT_HUB_FIELDS = {  # what mpt-1b-redpajama-200b's config.json holds beyond the fields that set the function
    "architectures": ["MosaicGPT"], "auto_map": {"AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
                                                 "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT"},
    "attn_impl": "torch", "low_precision_layernorm": False, "init_device": "cpu", "param_init_fn": "kaiming_normal_",
    "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "float32", "verbose": 0, "use_cache": False}


def write_mosaic_gpt_layout(model: torch.nn.Module, directory: Path, state: dict | None = None, **config) -> None:
    """A MosaicGPT hub repository (OpenFlamingo-3B's LM): its config fields, `pytorch_model.bin` without the head
    (tied to `transformer.wte`). `state` replaces the model's tensors; `config` overrides fields."""
    directory.mkdir()
    c = model.config
    fields = {"model_type": "mosaic_gpt", **MOSAIC_GPT_HUB_FIELDS}
    for key in ("d_model", "n_heads", "n_layers", "mlp_ratio", "max_seq_len", "vocab_size", "alibi", "alibi_bias_max",
                "attn_clip_qkv", "attn_qk_ln", "softmax_scale", "logit_scale", "no_bias", "embedding_fraction",
                "prefix_lm", "attn_pdrop", "resid_pdrop", "emb_pdrop"):
        fields[key] = getattr(c, key)
    fields.update(config)
    (directory / "config.json").write_text(json.dumps(fields))
    if state is None:
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, directory / "pytorch_model.bin")


# ------------------------------------------------------------------------------------------------------ references
@torch.no_grad()
def continuation_logprobs_reference(model: Flamingo, input_ids: torch.Tensor, continuation: Sequence[int],
                                    **media: Any) -> float:
    """Sum of log-probs of `continuation` after `input_ids (1, T)` from one plain uncached forward."""
    full = torch.cat([input_ids, torch.tensor([list(continuation)], device=input_ids.device)], dim=1)
    logits = model(full, **media).logits[0].float()  # (T + C, V)
    logprobs = F.log_softmax(logits[input_ids.shape[1] - 1: -1], dim=-1)
    return float(logprobs.gather(-1, full[0, input_ids.shape[1]:, None]).sum())


def training_batch(processor, texts: list[str], images_per_row: list[int], seed: int = 0) -> dict:
    """A right-padded training batch: row i holds `images_per_row[i]` images (its text as many `<image>`s)."""
    images = [[random_image(seed + 10 * i + k) for k in range(n)] for i, n in enumerate(images_per_row)]
    batch = processor(texts, images, padding_side="right")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def loss_and_grads(model, batch: dict, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------- evaluation datasets
WORDS = ["red", "blue", "two", "yes", "no", "cat"]


def hub_cache_entry(cache: Path, repo: str, files: Path, revision: str = "main",
                    commit: str = "0123456789abcdef0123456789abcdef01234567", repo_type: str = "model") -> None:
    """`files` (a directory) as the cached snapshot of hub repository `repo` (a model, or a dataset) at `revision`:
    what a download leaves behind, read by `huggingface_hub` with `HF_HUB_CACHE=cache` (and `HF_HUB_OFFLINE=1`: no
    network)."""
    folder = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    shutil.copytree(files, folder / "snapshots" / commit)


def _image(root: Path, name: str, seed: int) -> str:
    (root / Path(name).parent).mkdir(parents=True, exist_ok=True)
    random_image(seed).save(root / name)
    return name


def _video(root: Path, name: str, seed: int, frames: int = 2) -> str:
    import av  # optional: the video extra

    (root / Path(name).parent).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(str(root / name), "w") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return name


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_vqa(root: Path, episodes: bool = False) -> Path:
    """5 train and 5 test questions (even ids name their image, odd ones are found by image_id)."""
    for split, ids in (("train", range(0, 5)), ("test", range(100, 105))):
        questions, annotations = [], []
        for i in ids:
            q = {"question_id": i, "image_id": i, "question": f"what is {i}?"}
            if i % 2 == 0:
                q["image"] = _image(root, f"images/q{i}.png", i)
            else:
                _image(root, f"images/{i}.png", i)  # found by image_id
            if episodes and split == "test":
                q["demo_ids"] = [(i + 3) % 5, (i + 1) % 5, i % 5]
            questions.append(q)
            answers = [WORDS[(i + j) % len(WORDS)] for j in range(10)]
            annotations.append({"question_id": i, "image_id": i, "answers": [{"answer": a} for a in answers],
                                "multiple_choice_answer": answers[0]})
        write_json(root / f"{split}_questions.json", {"questions": questions})
        write_json(root / f"{split}_annotations.json", {"annotations": annotations})
    return root


def make_captioning(root: Path) -> Path:
    """Karpathy splits: 3 demo images (train + restval), 3 test images, and a val image that is neither."""
    images = []
    for i, split in enumerate(["train", "restval", "train", "val", "test", "test", "test"]):
        images.append({"filepath": "images", "filename": _image(root, f"images/c{i}.png", i).split("/")[1],
                       "split": split, "cocoid": i,
                       "sentences": [{"raw": f"a {WORDS[i % 6]} square."}, {"raw": f"the {WORDS[(i + 1) % 6]} cat"}]})
    write_json(root / "captions.json", {"images": images})
    return root


def make_classification(root: Path) -> Path:
    """4 classes, 5 train and 3 test images; the first test sample (s10, a dog) ranks its own two candidates."""
    classes = ["cat", "dog", "red bird", "blue fish"]
    write_json(root / "classes.json", classes)
    for split, ids in (("train", range(5)), ("test", range(10, 13))):
        rows = [{"id": f"s{i}", "image": _image(root, f"images/{i}.png", i), "label": classes[i % 4]} for i in ids]
        if split == "test":
            rows[0].update(candidates=["dog", "cat"], label="dog")
        write_jsonl(root / f"{split}.jsonl", rows)
    return root


def make_hateful_memes(root: Path) -> Path:
    """4 train and 4 dev_seen memes (the test split's fallback), labels alternating."""
    for split, ids in (("train", range(4)), ("dev_seen", range(10, 14))):
        write_jsonl(root / f"{split}.jsonl", [{"id": i, "img": _image(root, f"img/{i}.png", i), "label": i % 2,
                                               "text": f"some {{text}} {i}"} for i in ids])
    return root


def make_videoqa(root: Path) -> Path:
    """3 train and 2 test 2-frame videos, named by path or by video_id."""
    for split, ids in (("train", range(3)), ("test", range(10, 12))):
        rows = []
        for i in ids:
            rec = {"id": i, "question": "what moves?", "answer": WORDS[i % 6]}
            if i % 2:
                rec["video"] = _video(root, f"videos/v{i}.mp4", i)
            else:
                _video(root, f"videos/{i}.mp4", i)
                rec["video_id"] = i
            rows.append(rec)
        write_json(root / f"{split}_qa.json", rows)
    return root


def make_video_captioning(root: Path) -> Path:
    """3 train and 2 test 2-frame videos with two captions each."""
    for split, ids in (("train", range(3)), ("test", range(10, 12))):
        write_json(root / f"{split}.json", [{"id": i, "video": _video(root, f"videos/{i}.mp4", i),
                                             "captions": [f"a {WORDS[i % 6]} thing moves", "something moves"]}
                                            for i in ids])
    return root


def make_videoqa_mc(root: Path) -> Path:
    """3 train and 3 test questions on 2-frame videos, 3 options each; answers by index or by text; two types."""
    for split, ids in (("train", range(3)), ("test", range(10, 13))):
        rows = []
        for i in ids:
            options = [WORDS[(i + j) % len(WORDS)] for j in range(3)]
            rows.append({"id": i, "video": _video(root, f"videos/{i}.mp4", i), "question": "what moves?",
                         "options": options, "answer": i % 3 if i % 2 else options[i % 3],
                         "type": "interaction" if i % 2 else "sequence"})
        write_jsonl(root / f"{split}.jsonl", rows)
    return root


def make_visdial(root: Path, dense: bool = True) -> Path:
    """VisDial v1.0 files: 4 train and 3 val dialogs of 3 rounds with 5 answer options each, images named by id the
    way VisDial's are; dense relevance for 2 of the val dialogs (the rounds NDCG is scored on), when `dense`."""
    questions = [f"is it {w}" for w in WORDS]
    answers = [f"{a} {w}" for a in ("yes", "no") for w in WORDS]
    for split, ids, prefix in (("train", range(4), "COCO_train2014"), ("val", range(10, 13), "VisualDialog_val2018")):
        dialogs = []
        for image_id in ids:
            _image(root, f"images/{prefix}_{image_id:012d}.png", image_id)
            rounds = []
            for r in range(3):
                options = [(image_id + r + j) % len(answers) for j in range(5)]
                gt = (image_id + r) % 5
                rounds.append({"question": (image_id + r) % len(questions), "answer": options[gt],
                               "answer_options": options, "gt_index": gt})
            dialogs.append({"image_id": image_id, "caption": f"a {WORDS[image_id % 6]} thing", "dialog": rounds})
        write_json(root / f"visdial_1.0_{split}.json",
                   {"split": split, "version": "1.0",
                    "data": {"questions": questions, "answers": answers, "dialogs": dialogs}})
    if dense:
        write_json(root / "visdial_1.0_val_dense_annotations.json",
                   [{"image_id": 10, "round_id": 2, "gt_relevance": [0.0, 1.0, 0.5, 0.0, 0.5]},
                    {"image_id": 12, "round_id": 3, "gt_relevance": [1.0, 0.0, 0.0, 0.5, 0.0]}])
    return root


DATASET_MAKERS = {"vqa": make_vqa, "captioning": make_captioning, "classification": make_classification,
                  "hateful_memes": make_hateful_memes, "videoqa": make_videoqa,
                  "video_captioning": make_video_captioning, "videoqa_mc": make_videoqa_mc,
                  "visdial": make_visdial}
TEST_SAMPLES = {"vqa": 5, "captioning": 3, "classification": 3, "hateful_memes": 4, "videoqa": 2,
                "video_captioning": 2, "videoqa_mc": 3, "visdial": 9}  # the evaluated samples of each fixture dataset


def save_sideways_jpeg(path: Path) -> Path:
    """A 40x20 JPEG (left half blue, right red) whose EXIF orientation (6) says: rotate 90 degrees clockwise to
    display. A rotation moves the blue half."""
    from PIL import Image

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes())
    return path
