"""Worker for tests/test_train_given_model.py's FSDP test: `Trainer(config, model=...)` under FSDP2.

    torchrun --nproc_per_node 2 tests/fsdp_given_model_worker.py CONFIG OUT [KEY=VALUE ...]

The model is the config's, with one frozen LM weight changed in memory; the config then names placeholder backbones
("unused"), as a config written only for the data and the run does. Rank 0 writes the model's frozen weights to
OUT/frozen.safetensors before training; each rank writes its trained parameters to OUT/params_rank{r}.safetensors."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from flamingo.runtime import leave_process_group_and_exit
from flamingo.train.config import load_config
from flamingo.train.trainer import Trainer, build_model


def main() -> None:
    config_path, out = sys.argv[1], sys.argv[2]
    config = load_config(config_path, [f"train.output_dir={out}", "train.distributed=fsdp", "train.progress=false",
                                       *sys.argv[3:]])
    torch.manual_seed(config.train.seed)
    model, processor = build_model(config)
    with torch.no_grad():
        next(p for n, p in model.lm.named_parameters() if "layers.0." in n).add_(0.5)  # not the LM's files
    config.model.vision = config.model.lm = "unused"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = Trainer(config, model=model, processor=processor)
    if trainer.rank == 0:
        save_file(frozen, os.path.join(out, "frozen.safetensors"))
    trainer.run()
    trained = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()
               for n, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(trained, os.path.join(out, f"params_rank{trainer.rank}.safetensors"))
    if dist.is_initialized():
        leave_process_group_and_exit(0)


if __name__ == "__main__":
    main()
