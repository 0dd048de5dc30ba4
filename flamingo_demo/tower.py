"""The demo's vision tower: a `CLIPVisionModel` pretrained contrastively on the world's image-caption pairs.

Trained as in CLIP (Radford et al. 2021): a symmetric InfoNCE loss between its max-pooled patch features and a tiny
bag-of-words text encoder, with a learned temperature; identical captions in a batch are not negatives (their targets
share the probability mass). Two additions make it learn shapes within a CPU budget: auxiliary attribute classifiers
whose labels are read off the captions (kind, colour, size, position, count, background), and 2-D sin-cos initial
values for its learned position embeddings. Only the tower is kept; its image processor (same size, mean = std = 0.5)
is saved beside it, so `AutoModel` / `AutoImageProcessor` load both.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModel

try:  # transformers 5: the PIL backend (the default one wants torchvision)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor

from .common import lr_at, resolve_size, words_of
from .sizes import MiniSize
from .world import BACKGROUNDS, COLOURS, COUNT_WORDS, KINDS, POSITIONS, SIZES, plural

PathLike = Union[str, os.PathLike]
Pairs = Union[PathLike, Sequence[tuple[np.ndarray, str]]]


def load_pairs(pairs: Pairs) -> tuple[np.ndarray, list[str]]:
    """Pairs from a JSONL file (`image` relative to the file, `caption`) or a list of (HxWx3 uint8, caption).
    Returns images (N, H, W, 3) uint8 and captions."""
    if isinstance(pairs, (str, os.PathLike)):
        path = Path(pairs)
        images, captions = [], []
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                with Image.open(path.parent / row["image"]) as im:
                    images.append(np.asarray(im.convert("RGB")))
                captions.append(row["caption"])
        return np.stack(images), captions
    if not pairs:
        raise ValueError("no image-text pairs given")
    return np.stack([np.asarray(im, dtype=np.uint8) for im, _ in pairs]), [c for _, c in pairs]



# Attribute vocabularies read off the captions (the auxiliary head's labels and the attribute accuracy probe).
ATTRIBUTES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "kind": KINDS, "size": SIZES,
                                          "position": tuple(POSITIONS), "count": tuple(COUNT_WORDS.values()),
                                          "background": tuple(BACKGROUNDS)}


# The six orders of the RGB channels; the first is the identity.
CHANNEL_ORDERS = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def recolour(pixels: torch.Tensor, orders: np.ndarray) -> torch.Tensor:
    """(N, 3, H, W) images with image i's RGB channels read in the order `orders[i]` ((N, 3) indices). Greys (the
    world's backgrounds) stay as they are; a red object turns green or blue, a yellow one cyan or purple."""
    return pixels[torch.arange(len(pixels))[:, None], torch.from_numpy(orders)]


def caption_labels(caption: str) -> dict[str, int]:
    """Attribute class indices stated by a caption (-100 where it says nothing). Only the caption is used: the
    auxiliary head learns nothing that the text does not say."""
    words = words_of(caption)
    found: dict[str, int] = {}
    for name, values in ATTRIBUTES.items():
        if name == "kind":
            hits = {i for i, v in enumerate(values) if v in words or plural(v) in words}
        elif name == "background":
            hits = {i for i, v in enumerate(values) if v in words} if "background" in words else set()
        else:
            hits = {i for i, v in enumerate(values) if v in words}
        found[name] = hits.pop() if len(hits) == 1 else -100
    if found["count"] == -100 and found["position"] != -100:  # "a ... on the left": one object
        found["count"] = 0
    return found


class BagOfWordsEncoder(nn.Module):
    """The contrastive text tower: mean of word embeddings -> MLP -> `embed_dim`. Word order barely matters in
    this world (each attribute has its own words), so a bag of words is enough and costs nothing."""

    def __init__(self, vocab: Sequence[str], width: int, embed_dim: int):
        super().__init__()
        self.index = {w: i + 1 for i, w in enumerate(vocab)}  # 0 = unknown word
        self.embed = nn.EmbeddingBag(len(vocab) + 1, width, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, offsets = [], []
        for text in texts:
            offsets.append(len(ids))
            ids.extend(self.index.get(w, 0) for w in words_of(text) or ["<empty>"])
        return torch.tensor(ids), torch.tensor(offsets)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(ids, offsets))  # (B, E)


class ContrastiveHead(nn.Module):
    """Pools the tower's patch features and projects them into the joint space; plus attribute classifiers.

    Max-pooling over the patch grid (CLS dropped): objects cover a few of the 64 patches, and a max lets their
    patches carry the signal as a CNN's global max-pool does (mean- and CLS-pooling learned shapes ~2x slower
    here). Every patch output gets a gradient, which matters because Flamingo reads patch features.
    """

    def __init__(self, hidden: int, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init temperature
        self.attributes = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in ATTRIBUTES.items()})
        self.mean_norm = nn.LayerNorm(hidden)
        self.mean_attributes = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in ATTRIBUTES.items()})

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden[:, 1:].amax(1))  # (B, S+1, D) -> (B, D)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(hidden))  # (B, E)

    def attribute_loss(self, hidden: torch.Tensor, labels: dict[str, torch.Tensor],
                       weights: Optional[dict[str, float]] = None, mean_weight: float = 0.0) -> torch.Tensor:
        """Attribute classifiers on the max-pooled patches and, with `mean_weight`, on their mean as well."""
        weights = weights or {}
        pools = [(self.pool(hidden), self.attributes, 1.0)]
        if mean_weight:
            pools.append((self.mean_norm(hidden[:, 1:].mean(1)), self.mean_attributes, mean_weight))
        losses = [scale * weights.get(k, 1.0) * F.cross_entropy(layers[k](pooled), labels[k], ignore_index=-100)
                  for pooled, layers, scale in pools for k in layers if bool((labels[k] >= 0).any())]
        return torch.stack(losses).sum() if losses else hidden.sum() * 0


def sincos_positions(dim: int, grid: int) -> torch.Tensor:
    """2-D sine-cosine position embeddings (MAE): (grid*grid, dim), x in the first half, y in the second."""
    if dim % 4:
        raise ValueError(f"hidden size must be a multiple of 4 for 2-D sin-cos positions, got {dim}")
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for coord in (x.flatten(), y.flatten()):
        angles = coord[:, None] * omega[None]  # (S, dim/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)  # (S, dim)


@torch.no_grad()
def init_positions(tower: CLIPVisionModel, scale: float) -> None:
    """Start the tower's learned position embeddings from scaled 2-D sin-cos ones (CLS row 0): neighbouring
    patches start out similar, so attention can find an object's other patches before it has learned where
    they are. They stay trainable; the saved model is an ordinary CLIPVisionModel."""
    embeddings = getattr(tower, "vision_model", tower).embeddings  # transformers 4 nests a `vision_model`
    weight = embeddings.position_embedding.weight  # (S+1, D)
    grid = int(round(math.sqrt(weight.shape[0] - 1)))
    weight[0].zero_()
    weight[1:] = scale * sincos_positions(weight.shape[1], grid)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1]: what the saved image processor computes (mean = std = 0.5)."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def vision_image_processor(image_size: int) -> Any:
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


@torch.no_grad()
def retrieval_accuracy(tower: CLIPVisionModel, head: ContrastiveHead, text: BagOfWordsEncoder, images: np.ndarray,
                       captions: Sequence[str], batch: int = 256) -> dict[str, float]:
    """Image -> text retrieval among the distinct captions of a held-out set: top-1 / top-5 accuracy and chance."""
    distinct = sorted(set(captions))
    where = {c: i for i, c in enumerate(distinct)}
    txt = F.normalize(text(*text.tokenize(distinct)), dim=-1)  # (C, E)
    hits1 = hits5 = 0
    for s in range(0, len(images), batch):
        img = F.normalize(head(tower(pixel_values=to_pixels(images[s:s + batch])).last_hidden_state), dim=-1)
        top = (img @ txt.T).topk(min(5, len(distinct)), dim=-1).indices  # (b, 5)
        target = torch.tensor([where[c] for c in captions[s:s + batch]])
        hits1 += int((top[:, 0] == target).sum())
        hits5 += int((top == target[:, None]).any(-1).sum())
    n = len(images)
    return {"retrieval_top1": hits1 / n, "retrieval_top5": hits5 / n, "retrieval_chance": 1 / len(distinct),
            "retrieval_candidates": len(distinct), "retrieval_images": n,
            "attribute_accuracy": attribute_accuracy(tower, head, text, images, captions)}


@torch.no_grad()
def attribute_accuracy(tower: CLIPVisionModel, head: ContrastiveHead, text: BagOfWordsEncoder, images: np.ndarray,
                       captions: Sequence[str]) -> dict[str, float]:
    """Zero-shot attribute probe on single-object captions: swap one attribute word of the true caption for each
    alternative ("a big red circle" -> "a big blue circle", ...) and check that the true caption ranks first.
    Chance: 1/8 for colour and kind, 1/2 for size, 1/5 for position."""
    img = F.normalize(head(tower(pixel_values=to_pixels(images)).last_hidden_state), dim=-1)  # (N, E)
    result = {}
    for name in ("colour", "kind", "size", "position"):
        values, hits, n = ATTRIBUTES[name], 0, 0
        for i, caption in enumerate(captions):
            words = caption.rstrip(".").split()
            where = [j for j, w in enumerate(words) if w in values]
            if len(where) != 1 or any(w in words for w in ("two", "three")):
                continue
            j = where[0]
            variants = [" ".join(words[:j] + [v] + words[j + 1:]) for v in values]
            txt = F.normalize(text(*text.tokenize(variants)), dim=-1)  # (V, E)
            hits += int(int((img[i] @ txt.T).argmax()) == values.index(words[j]))
            n += 1
        result[name] = round(hits / n, 4) if n else float("nan")
    return result


def grow_vision(pairs: Pairs, out_dir: PathLike, *, heldout: Optional[Pairs] = None,
                size: Union[str, MiniSize, None] = None, seed: int = 0, threads: Optional[int] = 2,
                progress: bool = True) -> dict:
    """Pretrain a `CLIPVisionModel` contrastively on image-text pairs; save it + its image processor in `out_dir`.

    Returns {"dir", "wall_s", "steps", "final_loss", and retrieval metrics on `heldout` when given}.
    """
    size, start = resolve_size(size), time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = _train_vision(pairs, out_dir, heldout, size, seed, progress)
    finally:
        torch.set_num_threads(previous_threads)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result


def _train_vision(pairs: Pairs, out_dir: PathLike, heldout: Optional[Pairs], size: MiniSize, seed: int,
                  progress: bool) -> dict:
    torch.manual_seed(seed)
    images, captions = load_pairs(pairs)
    if images.shape[1] != size.image_size or images.shape[2] != size.image_size:
        raise ValueError(f"images are {images.shape[1:3]}, the size preset says {size.image_size}")
    config = CLIPVisionConfig(hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
                              num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                              image_size=size.image_size, patch_size=size.patch_size, projection_dim=size.embed_dim)
    tower = CLIPVisionModel(config)
    if size.vision_sincos:
        init_positions(tower, size.vision_sincos)
    vocab = sorted({w for c in captions for w in words_of(c)})
    text = BagOfWordsEncoder(vocab, width=2 * size.embed_dim, embed_dim=size.embed_dim)
    head = ContrastiveHead(size.vision_hidden, size.embed_dim)
    params = [*tower.parameters(), *text.parameters(), *head.parameters()]
    optim = torch.optim.AdamW(params, lr=size.vision_lr, weight_decay=0.05)
    pixels = to_pixels(images)  # (N, 3, H, W)
    rng = np.random.default_rng(seed)
    recolour_rng = np.random.default_rng([seed, 1])  # its own stream: the batches stay those of `rng`
    caption_ids = np.unique(captions, return_inverse=True)[1]
    labels = {k: torch.tensor([caption_labels(c)[k] for c in captions]) for k in ATTRIBUTES}
    loss_value = float("nan")
    tower.train()
    for step in tqdm(range(size.vision_steps), desc="vision tower", leave=False, disable=not progress):
        batch = rng.choice(len(captions), size=min(size.vision_batch, len(captions)), replace=False)
        for group in optim.param_groups:
            group["lr"] = lr_at(step, size.vision_steps, size.vision_lr)
        # The first `recoloured` images of the batch get their RGB channels permuted (achromatic backgrounds stay
        # as they are): their captions' colour words no longer hold, so they sit out the contrastive loss and the
        # colour classifier, and only teach the other attribute classifiers, kind first, to ignore colour.
        recoloured = int(round(size.vision_recolour * len(batch)))
        images_in = pixels[batch]  # (B, 3, H, W), a copy
        if recoloured:
            orders = CHANNEL_ORDERS[recolour_rng.integers(1, len(CHANNEL_ORDERS), recoloured)]  # (r, 3), no identity
            images_in[:recoloured] = recolour(images_in[:recoloured], orders)
        hidden = tower(pixel_values=images_in).last_hidden_state  # (B, S+1, D)
        keep = batch[recoloured:]  # the images with their own colours
        img = F.normalize(head(hidden[recoloured:]), dim=-1)  # (B', E)
        txt = F.normalize(text(*text.tokenize([captions[i] for i in keep])), dim=-1)  # (B', E)
        logits = head.log_scale.clamp(max=math.log(100)).exp() * img @ txt.T  # (B', B')
        same = torch.from_numpy(caption_ids[keep][:, None] == caption_ids[keep][None, :]).float()
        targets = same / same.sum(-1, keepdim=True)  # identical captions are not negatives
        loss = 0.5 * (torch.sum(-targets * logits.log_softmax(-1), -1).mean()
                      + torch.sum(-targets * logits.T.log_softmax(-1), -1).mean())
        if size.vision_aux:
            batch_labels = {k: v[batch] for k, v in labels.items()}  # copies
            batch_labels["colour"][:recoloured] = -100
            loss = loss + size.vision_aux * head.attribute_loss(hidden, batch_labels,
                                                                {"kind": size.vision_kind_weight,
                                                                 "position": size.vision_position_weight},
                                                                size.vision_mean_aux)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        loss_value = loss.item()
    tower.eval()
    result: dict[str, Any] = {"dir": str(out_dir), "steps": size.vision_steps, "final_loss": round(loss_value, 4),
                              "params": sum(p.numel() for p in tower.parameters())}
    if heldout is not None:
        result.update(retrieval_accuracy(tower, head, text, *load_pairs(heldout)))
    tower.save_pretrained(str(out_dir))
    vision_image_processor(size.image_size).save_pretrained(str(out_dir))
    return result
