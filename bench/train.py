"""Training step: ours vs the OpenFlamingo peer, same shapes, same weights, same process.

    python -m bench.train --shape cpu                                  # 2 CPU cores, fp32
    python -m bench.train --shape gpu --device cuda --batch 8 --tokens 256 --images 5
    python -m bench.train --shape cpu --compile       # also ours with train.compile's regions (inductor)

Each model is moved to the device alone, so its peak memory is its own. OpenFlamingo runs its own recipe: fp32
weights under bf16 autocast, torch AdamW over its trained parameters (the whole input embedding included). Ours:
frozen backbones stored in bf16 on the GPU (fp32 on the CPU), fp32 master weights for the trained parameters, bf16
autocast, fused AdamW over the trained parameters only, the loss's logits made in chunks as the trainer makes them
(`--loss-chunks`, default `train.loss_chunks`; 0: the whole logits).

`--compile`: after the eager steps, the same model's regions are compiled in place (`flamingo.train.compile`) and
timed again (compile time = the first compiled step); both compute the loss of one batch at the same weights first,
and `compiled_loss_diff` is their difference. On the CPU the compiled step uses the dense masked cross-attention,
as the trainer does there; on a GPU "auto" (FlexAttention for training) in both. `--vision-graphs` (CUDA, with
`--compile`): then the frozen tower's forward is CUDA-graphed too (`train.vision_cuda_graphs`) and timed again
(`graphed_*`, its loss at the same weights in `graphed_loss_diff`).
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any, Callable, Optional

import torch

from bench.common import build_pair, machine, parse_args, print_json, print_table, profile_steps, sync, timed
from flamingo.model.quantize import cast_frozen
from flamingo.train.compile import compile_regions
from flamingo.train.config import TrainSection
from flamingo.train.flops import flops_estimate, peak_flops
from flamingo.train.tower_graphs import install_tower_graphs


def make_batch(processor: Any, batch: int, tokens: int, images: int, image_size: int, device: str) -> dict[str, Any]:
    tok = processor.tokenizer
    chunk = tok("<image>A photo of a small red circle next to a big blue square on green grass.<|endofchunk|>")[
        "input_ids"]
    ids = (chunk * (tokens // len(chunk) + 1))[:tokens]
    media = tok.convert_tokens_to_ids("<image>")
    count = ids.count(media)
    if count > images:  # keep exactly `images` placeholders: later ones become ordinary text
        seen = 0
        for i, t in enumerate(ids):
            if t == media:
                seen += 1
                if seen > images:
                    ids[i] = chunk[1]
        count = images
    input_ids = torch.tensor([ids] * batch, device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone(),
            "images": torch.randn(batch, count, 1, 3, image_size, image_size, device=device)}


def measure(step: Callable[[], None], device: str, repeats: int) -> tuple[float, float]:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, repeats, warmup=2)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return seconds, peak


def _profiled(step: Callable[[], None], device: str, prefix: str, name: str) -> dict[str, Any]:
    """`profile_steps` of one variant as its row columns: device-busy ms, kernels and idle fraction per step."""
    prof = profile_steps(step, device, name)
    return {f"{prefix}_device_busy_ms": prof["device_busy_ms"], f"{prefix}_kernels": prof["kernels_per_step"],
            f"{prefix}_idle_fraction": prof["device_idle_fraction"]}


def _time_peer(peer: torch.nn.Module, batch: dict[str, Any], autocast: Callable[[], Any],
               args: argparse.Namespace) -> dict[str, Any]:
    """OpenFlamingo's own recipe: fp32 weights under autocast, torch AdamW over its trained parameters."""
    opt = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-4)

    def peer_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = peer(vision_x=batch["images"], lang_x=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in peer.parameters() if p.requires_grad], 1.0)
        opt.step()

    seconds, peak = measure(peer_step, args.device, args.repeats)
    row = {"openflamingo_step_s": seconds, "openflamingo_samples_s": args.batch / seconds,
           "openflamingo_peak_gib": peak}
    if args.profile:
        row.update(_profiled(peer_step, args.device, "openflamingo", "openflamingo_train_step"))
    return row


def _ratios(row: dict[str, Any], bf16: bool, flops: Callable[[], float]) -> dict[str, Any]:
    """The row's ratios to OpenFlamingo and MFUs (CUDA, a GPU of `peak_flops`) of the variants measured so far;
    flops: one training pass's FLOPs (called only when an MFU is computed)."""
    out: dict[str, Any] = {}
    if "ours_samples_s" in row:
        out["samples_s_vs_openflamingo"] = row["ours_samples_s"] / row["openflamingo_samples_s"]
        if bf16:
            out["peak_memory_vs_openflamingo"] = row["ours_peak_gib"] / row["openflamingo_peak_gib"]
    peak_flops_s = peak_flops(torch.cuda.get_device_name(0)) if bf16 else None
    if peak_flops_s and "ours_step_s" in row:
        for mfu, step in (("ours_mfu", "ours_step_s"), ("compiled_mfu", "compiled_step_s"),
                          ("graphed_mfu", "graphed_step_s"), ("openflamingo_mfu", "openflamingo_step_s")):
            if step in row:
                out[mfu] = flops() / row[step] / peak_flops_s
    return out


def run(args: argparse.Namespace, progress: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """The row of every variant (the peer, ours eager, then checkpointed, or compiled and tower-graphed); progress:
    called with the row so far (its ratios included) after each variant but the last, so that a run cut by a time
    limit still reports what it measured."""
    pair = build_pair(args.shape, xattn_every=args.xattn_every)  # on the CPU, fp32
    dev, bf16 = args.device, args.device.startswith("cuda")
    batch = make_batch(pair.processor, args.batch, args.tokens, args.images, pair.image_size, dev)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else (lambda: torch.autocast(
        "cpu", enabled=False))
    row: dict[str, Any] = {"batch": args.batch, "tokens": args.tokens, "images": batch["images"].shape[1],
                           "loss_chunks": args.loss_chunks}

    flops = functools.cache(lambda: flops_estimate(pair.ours, batch))

    def report() -> None:
        if progress is not None:
            progress({**row, **_ratios(row, bf16, flops)})

    row.update(_time_peer(pair.peer.to(dev).train(), batch, autocast, args))  # its optimizer is freed on return
    pair.peer.to("cpu")
    report()

    # --- ours
    ours = pair.ours
    if bf16:
        cast_frozen(ours, torch.bfloat16)
    ours.to(dev).train()
    trained = [p for p in ours.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, fused=bf16)

    impl = {"xattn_impl": "auto"}

    def loss_now() -> float:  # the loss of the batch at the current weights (no step)
        with autocast():
            return float(ours(**batch, check_media=False, loss_chunks=args.loss_chunks, **impl).loss.detach())

    def our_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            # as the trainer: it checks the CPU batch
            loss = ours(**batch, check_media=False, loss_chunks=args.loss_chunks, **impl).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()

    seconds, peak = measure(our_step, dev, args.repeats)
    if args.profile:
        row.update(_profiled(our_step, dev, "ours", "ours_train_step"))
    row.update(ours_step_s=seconds, ours_samples_s=args.batch / seconds, ours_peak_gib=peak)
    if args.checkpointing or args.compile:
        report()
    if args.checkpointing:  # the same model and optimizer, LM layers now checkpointed
        ours.gradient_checkpointing_enable()
        seconds, peak = measure(our_step, dev, args.repeats)
        row.update(ours_ckpt_step_s=seconds, ours_ckpt_samples_s=args.batch / seconds, ours_ckpt_peak_gib=peak)
        row["ckpt_samples_s_vs_openflamingo"] = row["ours_ckpt_samples_s"] / row["openflamingo_samples_s"]
        if bf16:
            row["ckpt_peak_memory_vs_openflamingo"] = row["ours_ckpt_peak_gib"] / row["openflamingo_peak_gib"]
    if args.compile:
        row.update(_time_compiled(ours, our_step, loss_now, impl, args))
        row["compiled_vs_eager"] = row["ours_step_s"] / row["compiled_step_s"]
        row["compiled_samples_s_vs_openflamingo"] = row["compiled_samples_s"] / row["openflamingo_samples_s"]
        if bf16:
            row["compiled_peak_memory_vs_openflamingo"] = row["compiled_peak_gib"] / row["openflamingo_peak_gib"]
        if getattr(args, "vision_graphs", False):
            report()
            row.update(_time_graphed(ours, our_step, loss_now, args))
            row["graphed_samples_s_vs_openflamingo"] = row["graphed_samples_s"] / row["openflamingo_samples_s"]
            if bf16:
                row["graphed_peak_memory_vs_openflamingo"] = row["graphed_peak_gib"] / row["openflamingo_peak_gib"]
    row.update(_ratios(row, bf16, flops))
    return row


def _time_compiled(ours: torch.nn.Module, our_step: Callable[[], None], loss_now: Callable[[], float],
                   impl: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Our step again with train.compile's regions (compiled in place, at the weights the eager steps left)."""
    dev = args.device
    eager_loss = loss_now()
    compile_regions(ours)
    if not dev.startswith("cuda"):
        impl["xattn_impl"] = "reference"  # the trainer's choice on a CPU (no graph breaks)
    start = time.perf_counter()
    compiled_loss = loss_now()
    our_step()  # forward and backward compile here
    sync(dev)
    compile_s = time.perf_counter() - start
    seconds, peak = measure(our_step, dev, args.repeats)
    row = {"compiled_step_s": seconds, "compiled_samples_s": args.batch / seconds, "compiled_peak_gib": peak,
           "compile_s": compile_s, "compiled_loss_diff": abs(compiled_loss - eager_loss)}
    if args.profile:
        row.update(_profiled(our_step, dev, "compiled", "ours_compiled_train_step"))
    return row


def _time_graphed(ours: torch.nn.Module, our_step: Callable[[], None], loss_now: Callable[[], float],
                  args: argparse.Namespace) -> dict[str, Any]:
    """The compiled step again with the frozen tower's forward replayed from CUDA graphs (captured on first use)."""
    compiled_loss = loss_now()
    graphs = install_tower_graphs(ours.vision)
    graphed_loss = loss_now()  # captures the batch's graph
    seconds, peak = measure(our_step, args.device, args.repeats)
    row = {"graphed_step_s": seconds, "graphed_samples_s": args.batch / seconds, "graphed_peak_gib": peak,
           "graphed_loss_diff": abs(graphed_loss - compiled_loss), "vision_graphs": graphs.stats.captured,
           "vision_eager_calls": graphs.stats.eager_calls}
    if args.profile:
        row.update(_profiled(our_step, args.device, "graphed", "ours_graphed_train_step"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu", choices=["tiny", "cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--xattn-every", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true",
                        help="also time ours with activation checkpointing of the LM's decoder layers")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with train.compile's regions (after its eager steps, same process)")
    parser.add_argument("--vision-graphs", action="store_true",
                        help="with --compile on CUDA: also time the compiled step with the frozen tower CUDA-graphed")
    parser.add_argument("--loss-chunks", type=int, default=TrainSection.loss_chunks,
                        help="the loss's logits in this many chunks (train.loss_chunks; 0: whole)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each step (torch.profiler): top kernels, host ops, device-busy time")
    args = parse_args(parser)
    if args.vision_graphs and not (args.compile and args.device.startswith("cuda")):
        parser.error("--vision-graphs needs --compile and a CUDA device")
    if args.compile and args.checkpointing:
        parser.error("--compile and --checkpointing: one at a time (the compiled step would run checkpointed too)")
    print(f"# bench.train on {machine()}, shape={args.shape}")
    header = {"shape": args.shape, "device": machine(), "xattn_every": args.xattn_every}
    row = run(args, progress=lambda partial: print_json("train.partial", {**header, **partial}))
    print_json("train", {**header, **row})
    print_table([row], list(row))


if __name__ == "__main__":
    main()
