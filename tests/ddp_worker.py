"""Worker for tests/test_train.py's DDP test.

    torchrun --nproc_per_node 2 tests/ddp_worker.py CONFIG OUT     # DDP: each rank its shard, per-rank batch b
    python tests/ddp_worker.py CONFIG OUT --single                # one process: rank 0's + rank 1's batches (2b)
    torchrun --nproc_per_node 2 tests/ddp_worker.py CONFIG OUT train.distributed=fsdp   # FSDP2 instead of DDP

Each rank writes the seed of its generators (`torch.initial_seed()`) to OUT/seed_rank{r}.json before training and its
trained parameters to OUT/params_rank{r}.safetensors after it.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from flamingo.data.build import build_sources
from flamingo.runtime import leave_process_group_and_exit
from flamingo.train.config import load_config
from flamingo.train.trainer import Trainer, build_model


def _right_pad(batch: dict[str, Any], length: int) -> dict[str, Any]:
    extra = length - batch["input_ids"].shape[1]
    if extra == 0:
        return batch
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) if k in fill else v for k, v in batch.items()}


def _with_media(batch: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """`batch` (text-only rows: no `images`) with padding media shaped like `like`'s, none of them real."""
    if batch.get("images") is not None or like.get("images") is None:
        return batch
    rows = batch["input_ids"].shape[0]
    media = {"images": like["images"].new_zeros(rows, *like["images"].shape[1:])}
    if like.get("num_frames") is not None:
        media["num_frames"] = like["num_frames"].new_zeros(rows, *like["num_frames"].shape[1:])
    return {**batch, **media}


class ConcatSource:
    """The batches two ranks would see, concatenated: what one process with the doubled batch trains on."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batches in zip(*self.parts):
            length = max(b["input_ids"].shape[1] for b in batches)  # right-padded to the longer rank's length:
            batches = [_right_pad(b, length) for b in batches]  # pads are masked, unlabelled and after the text
            with_media = next((b for b in batches if b.get("images") is not None), batches[0])
            batches = [_with_media(b, with_media) for b in batches]
            shapes = {k: {tuple(b[k].shape[1:]) for b in batches} for k in batches[0] if torch.is_tensor(batches[0][k])}
            assert all(len(s) == 1 for s in shapes.values()), f"rank batches differ in shape: {shapes}"
            yield {k: torch.cat([b[k] for b in batches]) for k in with_media if torch.is_tensor(with_media[k])}

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p, s in zip(self.parts, state["parts"]):
            p.load_state_dict(s)


def main() -> None:
    config_path, out = sys.argv[1], sys.argv[2]
    overrides = [a for a in sys.argv[3:] if "=" in a]  # e.g. train.distributed=fsdp
    config = load_config(config_path, [f"train.output_dir={out}", *overrides])
    if "--single" in sys.argv:
        torch.manual_seed(config.train.seed)
        model, processor = build_model(config)
        per_rank = [build_sources(config.data, processor, rank=r, world_size=2, seed=config.train.seed)
                    for r in range(2)]
        sources = {name: ConcatSource([p[name] for p in per_rank]) for name in per_rank[0]}
        trainer = Trainer(config, sources=sources, model=model, processor=processor)
    else:
        trainer = Trainer(config)
    with open(os.path.join(out, f"seed_rank{trainer.rank}.json"), "w") as f:
        f.write(str(torch.initial_seed()))  # the seed of the rank's training draws
    trainer.run()
    trained = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()
               for n, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(trained, os.path.join(out, f"params_rank{trainer.rank}.safetensors"))
    if dist.is_initialized():
        leave_process_group_and_exit(0)  # as `flamingo train` does (gloo's threads vs a finalizing interpreter)


if __name__ == "__main__":
    main()
